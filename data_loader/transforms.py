"""Train and eval image transforms of the two input presets (docs/method.md, section 3) and the two-view wrapper.

Input presets (``--input-preset``, recorded in every checkpoint's ``data_config``):

- ``gcd`` (GCD's and the FaceGCD reference's): resize the shorter side to int(S / 0.875) (bicubic), random crop S and
  horizontal flip for training, centre crop S for evaluation, ImageNet mean and std.
- ``face`` (insightface's arcface_torch and its evaluation): the whole aligned crop (resized to S x S only when it has
  another size), horizontal flip for training, ``(x / 255 - 0.5) / 0.5``.

References: torchvision ``references/classification/presets.py`` (preset classes), GCD's
``ContrastiveLearningViewGenerator`` (independent views), insightface ``recognition/arcface_torch/dataset.py`` and
``eval/verification.py`` (the face preset).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from utils.presets import GCD_PRESET, preset_normalisation

logger = logging.getLogger(__name__)

CROP_PCT = 0.875


def resize_size(image_size: int) -> int:
    """Shorter-side resize applied before the crop: int(S / 0.875) (128 for S = 112)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(image_size / CROP_PCT)


class _PresetTransform:
    """One input preset (see the module docstring) for training or evaluation.

    Args:
        image_size: output side S.
        train: augment (random crop of the ``gcd`` preset, flip) or not.
        preset: ``gcd`` or ``face``.
    """

    def __init__(self, image_size: int, *, train: bool, preset: str = GCD_PRESET) -> None:
        mean, std = preset_normalisation(preset)
        self.image_size, self.preset = image_size, preset
        if preset == GCD_PRESET:
            resize = T.Resize(resize_size(image_size), interpolation=T.InterpolationMode.BICUBIC)
            geometry = [T.RandomCrop(image_size), T.RandomHorizontalFlip(0.5)] if train else [T.CenterCrop(image_size)]
        else:
            resize = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)
            geometry = [T.RandomHorizontalFlip(0.5)] if train else []
        self.transform = T.Compose([resize, *geometry, T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Returns: the transformed image, (3, S, S) float32."""
        return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(preset={self.preset}, {self.transform})"


class TrainTransform(_PresetTransform):
    """Training preset: ``gcd`` Resize(int(S/0.875), bicubic) -> RandomCrop(S) -> flip -> ImageNet normalisation;
    ``face`` the whole crop at S x S -> flip -> (x - 0.5) / 0.5."""

    def __init__(self, image_size: int = 112, preset: str = GCD_PRESET) -> None:
        super().__init__(image_size, train=True, preset=preset)


class EvalTransform(_PresetTransform):
    """Evaluation preset: ``gcd`` Resize(int(S/0.875), bicubic) -> CenterCrop(S) -> ImageNet normalisation; ``face``
    the whole crop at S x S -> (x - 0.5) / 0.5."""

    def __init__(self, image_size: int = 112, preset: str = GCD_PRESET) -> None:
        super().__init__(image_size, train=False, preset=preset)


class TwoViewTransform:
    """Applies a random transform ``n`` times independently and returns the list of views.

    Args:
        transform: the per-view transform (e.g. :class:`TrainTransform`).
        n: number of views.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], n: int = 2) -> None:
        if n < 1:
            raise ValueError(f"n (number of views) must be >= 1, got {n}")
        self.transform = transform
        self.n = n

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """Returns: ``n`` independently transformed views."""
        return [self.transform(img) for _ in range(self.n)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, {self.transform!r})"
