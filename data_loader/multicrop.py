"""DINO's multi-crop augmentation, optionally split into a clean geometric crop and its photometric copy (LAFS).

Each image gives two global views and ``n_local`` local views, global ones first. A view is a random resized crop
(bicubic) and a horizontal flip (the *geometric* stage), then colour jitter (p 0.8), grayscale (p 0.2), Gaussian
blur and solarisation (the *photometric* stage), then ImageNet normalisation. Blur probability is 1.0 for the first
global view, 0.1 for the second and 0.5 for the local ones; only the second global view is solarised (p 0.2).

With ``split_photometric=True`` every view is a :class:`CropPair`: the normalised clean geometric crop and the
normalised photometric copy of that same crop. LAFS predicts landmarks on the clean crop and samples its patches
from the augmented copy; a front end (``model.dino.FrontEnd``) receives both. ``default_collate`` batches a list of
pairs into a list of pairs of (B, 3, s, s) tensors, so ``GCDDataset(transform=MultiCropTransform(...))`` items
``(views, label, uq_idx[, is_labelled])`` load as they are.

All randomness is drawn from torch's generator (so a DataLoader worker seed fixes every view). DINO's blur draws its
probability and radius from Python's ``random``; here they come from torch, with the same distributions.

References:
    - DINO (Caron et al., ICCV 2021), facebookresearch/dino ``main_dino.py`` ``DataAugmentationDINO`` and
      ``utils.py`` ``GaussianBlur`` / ``Solarization``: the augmentations and their probabilities.
    - DINOv2 ``dinov2/data/augmentations.py``: the geometric / photometric split of a view.
    - LAFS (Sun et al., CVPR 2024): landmarks from the clean crop, patches from its photometric copy.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from utils.presets import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

# DINO's photometric settings: ColorJitter(brightness, contrast, saturation, hue) applied with probability 0.8.
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
COLOR_JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_P = {"global_1": 1.0, "global_2": 0.1, "local": 0.5}
SOLARIZE_P = 0.2  # the second global view only
SOLARIZE_THRESHOLD = 128  # PIL ImageOps.solarize default, as DINO


class CropPair(NamedTuple):
    """One view split for a landmark front end (batched by ``default_collate`` into a pair of (B, 3, s, s)).

    Attributes:
        augmented: the photometric copy of ``clean``, normalised, (3, s, s): what the network's patches come from.
        clean: the geometric crop (crop and flip only), normalised, (3, s, s): what landmarks are predicted on.
    """

    augmented: torch.Tensor
    clean: torch.Tensor


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius ~ U(radius_min, radius_max) (DINO's ``GaussianBlur``).

    Args:
        p: probability of blurring.
        radius_min: smallest blur radius (PIL's ``GaussianBlur`` radius, i.e. the standard deviation in pixels).
        radius_max: largest blur radius.
    """

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"blur probability must be in [0, 1], got {p}")
        if not 0.0 < radius_min <= radius_max:
            raise ValueError(f"blur radii must satisfy 0 < radius_min <= radius_max, got {radius_min}, {radius_max}")
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        """Returns: ``img`` blurred with probability ``p``, else unchanged."""
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


def _check_scale(name: str, scale: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(s) for s in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {scale}")
    return lo, hi


def _geometric(size: int, scale: tuple[float, float]) -> T.Compose:
    """Random resized crop (bicubic) to ``size`` with area in ``scale``, then a horizontal flip (p 0.5)."""
    crop = T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, T.RandomHorizontalFlip(p=0.5)])


def _photometric(blur_p: float, solarize_p: float) -> T.Compose:
    """Colour jitter (p 0.8), grayscale (p 0.2), blur (p ``blur_p``) [, solarisation (p ``solarize_p``)] on PIL."""
    steps = [
        T.RandomApply([T.ColorJitter(*COLOR_JITTER)], p=COLOR_JITTER_P),
        T.RandomGrayscale(p=GRAYSCALE_P),
        RandomGaussianBlur(blur_p),
    ]
    if solarize_p > 0:
        steps.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize_p))
    return T.Compose(steps)


class MultiCropTransform:
    """DINO multi-crop views of a PIL image: 2 global then ``n_local`` local ones (see the module docstring).

    Args:
        global_size: side of the global views (DINO 224; 112 for faces).
        local_size: side of the local views (DINO 96 at 224, i.e. 48 at 112; LAFS crops locals at 112 and lets
            its front end shrink them to 6 x 6 landmark patches).
        n_local: number of local views (DINO and LAFS: 8).
        global_scale: area range of the global crops.
        local_scale: area range of the local crops.
        split_photometric: return a :class:`CropPair` (``augmented`` copy, ``clean`` crop) per view, not a tensor.
        mean: normalisation mean.
        std: normalisation std.
    """

    def __init__(
        self,
        global_size: int = 112,
        local_size: int = 48,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        *,
        split_photometric: bool = False,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        if global_size <= 0 or local_size <= 0:
            raise ValueError(f"crop sizes must be positive, got global {global_size} and local {local_size}")
        if n_local < 0:
            raise ValueError(f"n_local (number of local crops) must be >= 0, got {n_local}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local = int(n_local)
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        self.split_photometric = split_photometric

        global_geometric = _geometric(self.global_size, self.global_scale)
        local_geometric = _geometric(self.local_size, self.local_scale)
        local_photometric = _photometric(BLUR_P["local"], 0.0)
        # (geometric stage, photometric stage) of each view, in output order
        self.views: list[tuple[T.Compose, T.Compose]] = [
            (global_geometric, _photometric(BLUR_P["global_1"], 0.0)),
            (global_geometric, _photometric(BLUR_P["global_2"], SOLARIZE_P)),
        ] + [(local_geometric, local_photometric)] * self.n_local
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    @property
    def num_views(self) -> int:
        """Views per image: 2 global + ``n_local``."""
        return len(self.views)

    def __call__(self, img: Image.Image) -> list[torch.Tensor] | list[CropPair]:
        """Make the views of one image.

        Args:
            img: an RGB PIL image.

        Returns:
            ``num_views`` normalised views, the 2 global (3, global_size, global_size) first, then the local
            (3, local_size, local_size) ones; each a :class:`CropPair` when ``split_photometric``.
        """
        out: list = []
        for geometric, photometric in self.views:
            crop = geometric(img)
            augmented = self.normalize(photometric(crop))
            out.append(CropPair(augmented, self.normalize(crop)) if self.split_photometric else augmented)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global {self.global_size} px scale {self.global_scale}, {self.n_local} local "
            f"{self.local_size} px scale {self.local_scale}, split_photometric={self.split_photometric})"
        )
