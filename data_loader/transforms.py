"""Train and eval image transforms (docs/method.md, section 3) and the two-view wrapper.

References: torchvision ``references/classification/presets.py`` (preset classes), GCD's
``ContrastiveLearningViewGenerator`` (independent views).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PCT = 0.875


def resize_size(image_size: int) -> int:
    """Shorter-side resize applied before the crop: int(S / 0.875) (128 for S = 112)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(image_size / CROP_PCT)


class _PresetTransform:
    """Resize(int(S/0.875), bicubic) -> crop(S) [-> RandomHorizontalFlip(0.5)] -> tensor -> normalise.

    Args:
        image_size: output side S.
        train: random crop and flip (training) or centre crop (evaluation).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(
        self,
        image_size: int,
        *,
        train: bool,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.image_size = image_size
        resize = T.Resize(resize_size(image_size), interpolation=T.InterpolationMode.BICUBIC)
        geometry = [T.RandomCrop(image_size), T.RandomHorizontalFlip(0.5)] if train else [T.CenterCrop(image_size)]
        self.transform = T.Compose([resize, *geometry, T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Returns: the transformed image, (3, S, S) float32."""
        return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class TrainTransform(_PresetTransform):
    """Training preset: Resize(int(S/0.875), bicubic) -> RandomCrop(S) -> RandomHorizontalFlip -> normalise."""

    def __init__(self, image_size: int = 112, **kwargs) -> None:
        super().__init__(image_size, train=True, **kwargs)


class EvalTransform(_PresetTransform):
    """Evaluation preset: Resize(int(S/0.875), bicubic) -> CenterCrop(S) -> tensor -> normalise."""

    def __init__(self, image_size: int = 112, **kwargs) -> None:
        super().__init__(image_size, train=False, **kwargs)


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
