"""LAFS's view front end: landmarks from the clean crop, 5 px jitter, 36-landmark local mosaics (pretraining.md)."""

import dataclasses

import pytest
import torch

from model.dino import DINOConfig, build_dino
from model.landmark import (
    LAFSViewFrontEnd,
    LandmarkCNN,
    LandmarkFrontEnd,
    check_local_landmarks,
    landmark_mosaic,
    save_landmark_weights,
)


def _fixed_landmarks_cnn(coords: torch.Tensor, size: int) -> LandmarkCNN:
    """A landmark CNN whose outputs ignore the image: theta = the bias, which the min-max rescale maps to ``coords``.

    ``coords`` (L, 2) must span exactly [0, size - 1] over its 2L values (the rescale is then the identity).
    """
    cnn = LandmarkCNN(coords.shape[0])
    with torch.no_grad():
        cnn.output.weight.zero_()
        cnn.output.bias.copy_(coords.reshape(-1).float())
    assert coords.min() == 0 and coords.max() == size - 1
    return cnn


def _responsive_cnn() -> LandmarkCNN:
    """A random landmark CNN with BatchNorm statistics of real inputs, so its eval-mode output depends on the image
    (with the initial running statistics a random MobileNetV3 gives nearly the same landmarks for any input)."""
    cnn = LandmarkCNN(196)
    for module in cnn.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        cnn.train()(torch.rand(16, 3, 112, 112))
    return cnn.eval()


def _front_end(cnn: LandmarkCNN | None = None, **kwargs) -> LAFSViewFrontEnd:
    return LAFSViewFrontEnd(LandmarkFrontEnd(112, 8, frozen=True, cnn=cnn), **kwargs)


def test_landmarks_come_from_the_clean_crop_and_the_mosaic_from_the_augmented_copy():
    torch.manual_seed(0)
    front = _front_end(_responsive_cnn(), jitter_std=0.0).eval()
    clean, augmented = torch.rand(2, 3, 112, 112), torch.rand(2, 3, 112, 112)
    coords = front.view_landmarks(augmented, clean, global_view=True)
    torch.testing.assert_close(coords, front.landmarks.cnn(clean))
    assert not torch.allclose(coords, front.landmarks.cnn(augmented))
    mosaic = front(augmented, clean, global_view=True)
    torch.testing.assert_close(mosaic, landmark_mosaic(augmented, coords, 8))
    # without a clean crop the view itself gives the landmarks
    torch.testing.assert_close(front.view_landmarks(augmented, None, global_view=True), front.landmarks.cnn(augmented))


def test_jitter_has_the_asked_standard_deviation_in_training_only():
    torch.manual_seed(1)
    front = _front_end(jitter_std=5.0)
    images = torch.rand(16, 3, 112, 112)
    exact = front.landmarks.cnn(images)
    jittered = front.train().view_landmarks(images, None, global_view=True)
    noise = (jittered - exact).flatten()  # 16 * 196 * 2 = 6272 draws of N(0, 5^2)
    assert abs(noise.mean().item()) < 0.25
    assert noise.std().item() == pytest.approx(5.0, rel=0.05)
    torch.testing.assert_close(front.eval().view_landmarks(images, None, global_view=True), exact)


def test_local_views_keep_36_random_landmarks_in_index_order():
    size, grid = 112, 14
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack((xs, ys), dim=-1).reshape(-1, 2).float() * 8 + 4  # landmark k at tile k's centre
    coords[-1] = size - 1  # the rescale needs the values to span [0, 111]
    coords[0] = 0
    front = _front_end(_fixed_landmarks_cnn(coords, size), jitter_std=0.0).train()
    torch.manual_seed(2)
    images = torch.rand(3, 3, size, size)
    torch.manual_seed(3)
    local = front.view_landmarks(images, None, global_view=False)
    assert local.shape == (3, 36, 2)
    full = landmark_mosaic(images, front.landmarks.cnn(images), 8)
    torch.manual_seed(3)  # the same draw of landmarks
    mosaic = front(images, None, global_view=False)
    assert mosaic.shape == (3, 3, 48, 48)
    kept = []
    for b in range(3):
        index = torch.cdist(local[b], coords).argmin(dim=1).tolist()  # which landmark each kept one is
        assert index == sorted(index) and len(set(index)) == 36
        kept.append(index)
        for slot, k in enumerate(index):  # tile `slot` of the local mosaic is tile k of the full one
            r, c = divmod(slot, 6)
            tile = mosaic[b, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]
            torch.testing.assert_close(
                tile, full[b, :, (k // 14) * 8 : (k // 14 + 1) * 8, (k % 14) * 8 : (k % 14 + 1) * 8]
            )
    assert kept[0] != kept[1], "every image draws its own landmarks"
    # eval mode: the first 36, deterministic
    torch.testing.assert_close(
        front.eval().view_landmarks(images, None, global_view=False), coords[:36].expand(3, -1, -1)
    )


@pytest.mark.parametrize("count", [0, 35, 37, 225])
def test_local_landmark_counts_that_do_not_fit_the_grid_are_refused(count):
    with pytest.raises(ValueError, match=f"--local-landmarks {count} does not fit"):
        check_local_landmarks(count, 196)
    with pytest.raises(ValueError, match=f"--local-landmarks {count}"):
        _front_end(local_landmarks=count)
    assert check_local_landmarks(196, 196) == 14


def test_lafs_needs_a_frozen_cnn_and_an_existing_weights_file(tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        LAFSViewFrontEnd(LandmarkFrontEnd(112, 8, frozen=False))
    cfg = DINOConfig(arch="vit_tiny", patch_size=16, img_size=32, out_dim=64, n_local=2, epochs=2, landmark_cnn=True)
    missing = tmp_path / "none.pth"
    with pytest.raises(FileNotFoundError, match=f"--landmark-weights {missing} does not exist"):
        build_dino(cfg, landmark_weights=missing)
    weights = save_landmark_weights(LandmarkCNN(4), tmp_path / "lm.pth")
    with pytest.raises(ValueError, match="--local-landmarks 36 does not fit"):
        build_dino(cfg, landmark_weights=weights)  # 32 px / 16 px patches: 4 landmarks
    method = build_dino(dataclasses.replace(cfg, local_landmarks=1), landmark_weights=weights)
    assert not any(p.requires_grad for p in method.front_end.parameters())
    views = [torch.rand(2, 3, 32, 32)] * 2, [torch.rand(2, 3, 32, 32)] * 2
    out = method(*views)
    assert torch.isfinite(out["loss"])
