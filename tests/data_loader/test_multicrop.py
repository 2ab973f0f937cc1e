"""DINO multi-crop views: counts and shapes, the clean/photometric split, solarisation placement, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from data_loader.multicrop import CropPair, MultiCropTransform
from utils.presets import IMAGENET_MEAN, IMAGENET_STD


def random_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    gen = np.random.default_rng(seed)
    return Image.fromarray(gen.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def constant_image(value: int) -> Image.Image:
    return Image.new("RGB", (40, 40), (value, value, value))


def normalised(value: int) -> torch.Tensor:
    """(value / 255 - mean) / std per channel, (3, 1, 1)."""
    return ((value / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def test_views_count_and_shapes_globals_first():
    transform = MultiCropTransform(global_size=32, local_size=16, n_local=3)
    views = transform(random_image())
    assert transform.num_views == len(views) == 5
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])  # independent crops


def test_split_pairs_share_the_crop_and_only_the_copy_is_augmented():
    """A grey image: every crop of it is that grey, so the clean view is exactly normalised grey; with colour jitter
    (p 0.8) some augmented copies differ, and each augmented copy is still a function of its clean crop."""
    transform = MultiCropTransform(32, 16, 2, split_photometric=True)
    changed = 0
    for _ in range(10):
        views = transform(constant_image(100))
        assert all(isinstance(v, CropPair) for v in views)
        assert [tuple(v.clean.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
        for view in views:
            assert view.augmented.shape == view.clean.shape
            torch.testing.assert_close(view.clean, normalised(100).expand_as(view.clean), rtol=0, atol=1e-5)
            changed += int(not torch.allclose(view.augmented, view.clean, atol=1e-5))
    assert changed > 0


def test_split_augmented_copy_is_the_photometric_stage_of_the_clean_crop():
    """Replaying the RNG: each pair is (normalise(photometric(crop)), normalise(crop)) of the same geometric crop."""
    transform = MultiCropTransform(32, 16, 2, split_photometric=True)
    image = random_image(3)
    torch.manual_seed(7)
    views = transform(image)
    torch.manual_seed(7)
    for (geometric, photometric), view in zip(transform.views, views):
        crop = geometric(image)
        torch.testing.assert_close(view.augmented, transform.normalize(photometric(crop)), rtol=0, atol=0)
        torch.testing.assert_close(view.clean, transform.normalize(crop), rtol=0, atol=0)
    # the same seed without the split gives the augmented copies
    torch.manual_seed(7)
    plain = MultiCropTransform(32, 16, 2)(image)
    for a, b in zip(plain, views):
        torch.testing.assert_close(a, b.augmented, rtol=0, atol=0)


def test_only_the_second_global_view_is_solarised():
    """On a white image only solarisation darkens a view: brightness x[0.6, 1.4] keeps it >= 153 >= 128 (then
    255 - v <= 102), contrast of a constant image is the identity, saturation, hue, grayscale and blur change
    nothing. DINO solarises the second global view with p 0.2: over 300 images 60 expected (std 6.9)."""
    transform = MultiCropTransform(16, 8, 1)
    torch.manual_seed(0)
    dark = np.zeros(3, dtype=int)
    threshold = normalised(128)  # unsolarised views stay >= 153, solarised ones <= 102
    for _ in range(300):
        for i, view in enumerate(transform(constant_image(255))):
            dark[i] += int((view < threshold).all())
    assert dark[0] == 0 and dark[2] == 0
    assert 35 <= dark[1] <= 85, dark


def test_collated_batch_of_split_views():
    """default_collate turns items ``(views, label, uq_idx)`` into a list of CropPair of (B, 3, s, s) tensors."""
    transform = MultiCropTransform(32, 16, 1, split_photometric=True)
    batch = default_collate([(transform(random_image(i)), i, 10 + i) for i in range(3)])
    views, labels, uq_idx = batch
    assert len(views) == 3 and all(isinstance(v, CropPair) for v in views)
    assert [tuple(v.augmented.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)]
    assert [tuple(v.clean.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)]
    assert labels.tolist() == [0, 1, 2] and uq_idx.tolist() == [10, 11, 12]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_scale=(0.5, 0.4)), "global_scale"),
        (dict(local_scale=(0.0, 0.4)), "local_scale"),
        (dict(n_local=-1), "n_local"),
        (dict(local_size=0), "crop sizes"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCropTransform(**kwargs)
