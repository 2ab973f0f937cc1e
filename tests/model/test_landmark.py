"""Landmark front end (method.md 6, 12): min-max rescale, the landmark mosaic against hand-built tiles, the landmark
CNN and front end, reference-format weights, the LAFS landmark regularisation, and the landmark figures."""

import pytest
import torch
from PIL import Image

from model.landmark import (
    REFERENCE_LANDMARK_PATH,
    LandmarkCNN,
    LandmarkFrontEnd,
    landmark_mosaic,
    landmark_regularisation,
    landmark_regularisation_weight,
    load_landmark_weights,
    rescale,
    save_landmark_weights,
)
from utils.checkpoint import CheckpointError
from utils.landmark_plots import plot_landmarks, plot_mosaic

S, P, G = 16, 4, 4  # image side, tile side, tiles per side: 16 landmarks


def ramp_image(batch: int = 1, size: int = S, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 3, size, size) image with pixel value 1000 * channel + 10 * y + x (linear in x and y)."""
    c = torch.arange(3, dtype=dtype).view(3, 1, 1)
    y = torch.arange(size, dtype=dtype).view(1, size, 1)
    x = torch.arange(size, dtype=dtype).view(1, 1, size)
    return (1000 * c + 10 * y + x).expand(batch, 3, size, size).clone()


# Integer pixel indices a (x and y) of the 16 landmarks, placed at a + 0.5: tile k then covers pixels a-2 .. a+1.
AX = [2, 5, 9, 14, 3, 7, 11, 13, 2, 2, 8, 14, 6, 10, 4, 12]
AY = [3, 2, 14, 8, 12, 5, 5, 2, 9, 14, 7, 13, 4, 11, 10, 6]


def centred_coords() -> torch.Tensor:
    return torch.tensor([[ax + 0.5, ay + 0.5] for ax, ay in zip(AX, AY)]).unsqueeze(0)


def expected_mosaic(image: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The mosaic by plain indexing: tile k = image[:, ay-2:ay+2, ax-2:ax+2] at row k // G, column k % G."""
    out = torch.empty(3, S, S)
    for k, (ax, ay) in enumerate(zip(AX, AY)):
        tile = image[:, ay - 2 : ay + 2, ax - 2 : ax + 2]
        r, c = k // G, k % G
        out[:, r * P : (r + 1) * P, c * P : (c + 1) * P] = tile.transpose(1, 2) if transpose else tile
    return out


@pytest.fixture(scope="module")
def cnn_template() -> LandmarkCNN:
    torch.manual_seed(0)
    return LandmarkCNN(num_landmarks=16).eval()


# ---------------------------------------------------------------------------------------------------------------- #
# Min-max rescale


def test_rescale_by_hand():
    theta = torch.tensor([[1.0, 3.0, 2.0, 5.0], [-2.0, 0.0, 2.0, -1.0]])
    # Image 0: min 1, range 4, S - 1 = 4: (theta - 1) / 4 * 4 = [0, 2, 1, 4] -> pairs (0, 2), (1, 4).
    # Image 1: min -2, range 4: (theta + 2) / 4 * 4 = [0, 2, 4, 1] -> pairs (0, 2), (4, 1).
    out = rescale(theta, 5)
    assert out.shape == (2, 2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 2.0], [4.0, 1.0]]]))
    # A constant output has zero range: the epsilon gives zeros instead of NaN.
    assert torch.equal(rescale(torch.full((1, 6), 3.0), 112), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="even number"):
        rescale(torch.zeros(1, 5), 5)


# ---------------------------------------------------------------------------------------------------------------- #
# Mosaic


@pytest.mark.parametrize("orientation", ["natural", "reference"])
def test_mosaic_matches_hand_built_tiles(orientation):
    image = ramp_image()
    mosaic = landmark_mosaic(image, centred_coords(), P, orientation)
    assert mosaic.shape == (1, 3, S, S)
    torch.testing.assert_close(mosaic[0], expected_mosaic(image[0], transpose=orientation == "reference"))


def test_mosaic_orientation_by_hand():
    image = ramp_image()
    natural = landmark_mosaic(image, centred_coords(), P, "natural")[0]
    reference = landmark_mosaic(image, centred_coords(), P, "reference")[0]
    # Landmark 0 at (2.5, 3.5): tile 0 covers x = 0..3, y = 1..4 and sits at the mosaic's top-left corner.
    # Natural: row 0, column 1 is (x, y) = (1, 1) -> 10 * 1 + 1 = 11; reference: row 0 follows x (x = 0), column 1
    # follows y (y = 2) -> 10 * 2 + 0 = 20. Green channel adds 1000.
    assert natural[0, 0, 1].item() == 11.0 and reference[0, 0, 1].item() == 20.0
    assert natural[1, 0, 1].item() == 1011.0 and reference[1, 0, 1].item() == 1020.0
    # Landmark 5 (row 1, column 1 of the grid) at (7.5, 5.5): tile pixel (row 3, column 0) is x = 5, y = 6 naturally.
    assert natural[0, 4 + 3, 4 + 0].item() == 10 * 6 + 5
    assert reference[0, 4 + 3, 4 + 0].item() == 10 * 3 + 8


def test_mosaic_samples_at_offset_minus_half_pixel():
    """Bilinear sampling of a linear image is exact: tile pixel (i, j) of landmark (x, y) is the image's value at
    x + (j - P/2) - 0.5, y + (i - P/2) - 0.5 (natural orientation), for arbitrary fractional landmarks."""
    gen = torch.Generator().manual_seed(1)
    coords = 4 + 8 * torch.rand(2, 16, 2, generator=gen)  # samples at 4 - 2.5 .. 12 + 1.5: inside [0, 15]
    mosaic = landmark_mosaic(ramp_image(2), coords, P)
    offsets = torch.arange(P) - P / 2 - 0.5
    for b in range(2):
        for k in range(16):
            x, y = coords[b, k]
            r, c = k // G, k % G
            tile = mosaic[b, :, r * P : (r + 1) * P, c * P : (c + 1) * P]
            want = (
                1000 * torch.arange(3.0).view(3, 1, 1) + 10 * (y + offsets).view(1, P, 1) + (x + offsets).view(1, 1, P)
            )
            torch.testing.assert_close(tile, want, atol=1e-3, rtol=0)


def test_mosaic_zero_padding_outside_image():
    coords = centred_coords()
    coords[0, 0] = torch.tensor([0.5, 0.5])  # tile covers pixels -2 .. 1 in x and y
    coords[0, 1] = torch.tensor([100.0, -50.0])  # far outside
    mosaic = landmark_mosaic(ramp_image(), coords, P)[0]
    tile0 = mosaic[:, 0:4, 0:4]
    assert torch.equal(tile0[:, :2, :], torch.zeros(3, 2, 4)) and torch.equal(tile0[:, :, :2], torch.zeros(3, 4, 2))
    torch.testing.assert_close(tile0[:, 2:, 2:], ramp_image()[0, :, 0:2, 0:2])
    assert torch.equal(mosaic[:, 0:4, 4:8], torch.zeros(3, 4, 4))


def test_mosaic_gradients_by_hand():
    """d(sum of tile k)/dx_k = 3 channels * 16 samples * d(value)/dx = 48; d/dy_k = 48 * 10 = 480. Every in-bounds
    sample spreads weights summing to 1 over the image: the image gradient sums to 3 * 16 * 16 = 768."""
    gen = torch.Generator().manual_seed(2)
    coords = (4 + 8 * torch.rand(1, 16, 2, generator=gen)).requires_grad_(True)
    image = ramp_image().requires_grad_(True)
    landmark_mosaic(image, coords, P).sum().backward()
    torch.testing.assert_close(coords.grad[0, :, 0], torch.full((16,), 48.0), atol=1e-2, rtol=0)
    torch.testing.assert_close(coords.grad[0, :, 1], torch.full((16,), 480.0), atol=1e-2, rtol=0)
    torch.testing.assert_close(image.grad.sum(), torch.tensor(768.0))


def test_mosaic_dtype_and_subset_grid():
    image = ramp_image(dtype=torch.float64)
    out = landmark_mosaic(image, centred_coords(), P)  # float32 coords, float64 image
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[0], expected_mosaic(image[0], transpose=False).double())
    # A 2 x 2 grid of the first four landmarks (LAFS local views): an 8 x 8 mosaic of the same tiles.
    small = landmark_mosaic(ramp_image(), centred_coords()[:, :4], P, grid=2)
    assert small.shape == (1, 3, 8, 8)
    torch.testing.assert_close(small[0, :, 4:8, 0:4], ramp_image()[0, :, 12:16, 7:11])  # landmark 2 at (9.5, 14.5)


def test_mosaic_bad_sizes():
    with pytest.raises(ValueError, match="image size 16 is not a multiple of the landmark patch size 5"):
        landmark_mosaic(ramp_image(), centred_coords(), 5)
    with pytest.raises(ValueError, match="15 landmarks do not fill a 4 x 4 mosaic.*expected 16"):
        landmark_mosaic(ramp_image(), centred_coords()[:, :15], P)
    with pytest.raises(ValueError, match="unknown landmark tile orientation 'sideways'"):
        landmark_mosaic(ramp_image(), centred_coords(), P, "sideways")
    with pytest.raises(ValueError, match="coords must be"):
        landmark_mosaic(ramp_image(2), centred_coords(), P)


# ---------------------------------------------------------------------------------------------------------------- #
# Landmark CNN and front end


def test_cnn_shapes_at_112_and_64():
    torch.manual_seed(0)
    front = LandmarkFrontEnd()
    images = torch.randn(2, 3, 112, 112)
    coords = front.landmarks(images)
    assert coords.shape == (2, 196, 2) and coords.dtype == torch.float32
    assert coords.min() >= 0 and coords.max() <= 111
    torch.testing.assert_close(coords.flatten(1).amin(1), torch.zeros(2))  # the min-max rescale spans [0, 111]
    # The max is 111 * range / (range + eps): within 1e-2 px of 111 unless the raw range is below ~1e-5.
    torch.testing.assert_close(coords.flatten(1).amax(1), torch.full((2,), 111.0), atol=1e-2, rtol=0)
    assert front(images).shape == (2, 3, 112, 112)
    small = LandmarkFrontEnd(img_size=64, patch=8)
    assert small.cnn.num_landmarks == 64 and small.cnn.output.out_features == 128
    assert small.landmarks(images[:1, :, :64, :64]).shape == (1, 64, 2)
    assert small(images[:1, :, :64, :64]).shape == (1, 3, 64, 64)


def test_cnn_reference_key_format(cnn_template):
    keys = list(cnn_template.state_dict())
    assert "stn.0.0.weight" in keys and "stn.15.block.0.0.weight" in keys
    assert keys[-2:] == ["output.weight", "output.bias"]
    assert all(k.startswith(("stn.", "output.")) for k in keys)
    assert cnn_template.output.in_features == 160


def test_frozen_front_end_stays_eval_without_grads():
    front = LandmarkFrontEnd(img_size=16, patch=4, cnn=LandmarkCNN(16))
    front.train()
    assert front.training and not any(m.training for m in front.cnn.modules())
    assert not any(p.requires_grad for p in front.cnn.parameters())
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    assert not front.landmarks(images).requires_grad
    first, second = front(images), front(images)
    assert torch.equal(first, second)  # dropout off, BN running statistics
    first.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # the mosaic still passes gradients to images
    assert all(p.grad is None for p in front.cnn.parameters())


def test_trainable_front_end_gets_gradients():
    torch.manual_seed(0)
    front = LandmarkFrontEnd(img_size=32, patch=8, frozen=False).train()
    assert front.cnn.training and front.cnn.dropout.training
    images = torch.rand(2, 3, 32, 32)
    first = front(images)
    assert not torch.equal(first, front(images))  # dropout is active
    first.square().sum().backward()
    missing = [n for n, p in front.cnn.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_front_end_rejects_mismatched_cnn():
    with pytest.raises(ValueError, match="predicts 16 landmarks but 112 px images with 8 px tiles need 196"):
        LandmarkFrontEnd(cnn=LandmarkCNN(16))
    with pytest.raises(ValueError, match="image size 112 is not a multiple of the landmark patch size 9"):
        LandmarkFrontEnd(patch=9)


# ---------------------------------------------------------------------------------------------------------------- #
# Reference-format weights


def _fresh_cnn(seed: int) -> LandmarkCNN:
    torch.manual_seed(seed)
    return LandmarkCNN(num_landmarks=16).eval()


def test_weights_round_trip(tmp_path, cnn_template):
    path = save_landmark_weights(cnn_template, tmp_path / "sub" / "landmark.pth")
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(cnn_template.state_dict())
    assert all("stn" in k or "output" in k for k in saved)
    images = torch.randn(2, 3, 32, 32)
    fresh = _fresh_cnn(7)
    assert not torch.equal(fresh(images), cnn_template(images))
    load_landmark_weights(path, fresh)
    torch.testing.assert_close(fresh(images), cnn_template(images), rtol=0, atol=0)
    front = LandmarkFrontEnd(img_size=16, patch=4, cnn=_fresh_cnn(8))
    load_landmark_weights(path, front)
    torch.testing.assert_close(front.landmarks(images), cnn_template(images), rtol=0, atol=0)
    assert REFERENCE_LANDMARK_PATH == "pretrain_output/part_vit_B_34epoch.pth"


def test_weights_from_wrapped_checkpoint_with_module_prefix(tmp_path, cnn_template):
    state = {f"module.{k}": v for k, v in cnn_template.state_dict().items()}
    state["module.vit.cls_token"] = torch.zeros(1, 1, 8)  # the ViT part of a Part fViT checkpoint is ignored
    path = tmp_path / "part_vit.pth"
    torch.save({"state_dict": state, "epoch": 34}, path)
    fresh = _fresh_cnn(9)
    load_landmark_weights(path, fresh)
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh(images), cnn_template(images), rtol=0, atol=0)


def _bad_file(tmp_path, state: dict) -> str:
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    return str(path)


def test_weights_errors(tmp_path, cnn_template):
    fresh = _fresh_cnn(10)
    good = cnn_template.state_dict()

    path = _bad_file(tmp_path, {"model": {"module.vit.cls_token": torch.zeros(1, 1, 8)}})
    with pytest.raises(CheckpointError, match=r"expected keys containing stn\./output\.") as err:
        load_landmark_weights(path, fresh)
    assert path in str(err.value)

    path = _bad_file(tmp_path, {**good, "output.weight": torch.zeros(10, 160)})
    with pytest.raises(CheckpointError, match=r"output\.weight has shape \(10, 160\) in the file but \(32, 160\)"):
        load_landmark_weights(path, fresh)

    path = _bad_file(tmp_path, {k: v for k, v in good.items() if k != "stn.0.0.weight"})
    with pytest.raises(CheckpointError, match=r"missing 1 keys: stn\.0\.0\.weight") as err:
        load_landmark_weights(path, fresh)
    assert path in str(err.value)

    path = _bad_file(tmp_path, {**good, "stn.99.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 keys the landmark CNN lacks: stn\.99\.weight"):
        load_landmark_weights(path, fresh)

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_landmark_weights(tmp_path / "nope.pth", fresh)
    # Nothing was loaded by the failed attempts.
    assert not torch.equal(fresh.output.weight, cnn_template.output.weight)


# ---------------------------------------------------------------------------------------------------------------- #
# LAFS landmark regularisation


@pytest.mark.parametrize(
    "epoch, weight",
    [(0, 1000.0), (7, 1000.0), (8, 100.0), (13, 100.0), (14, 1.0), (20, 1.0), (21, 0.11), (27, 0.11), (28, 0.0)],
)
def test_regularisation_weight_boundaries(epoch, weight):
    assert landmark_regularisation_weight(epoch) == weight


def test_regularisation_weight_rejects_negative_epoch():
    with pytest.raises(ValueError, match="0-based"):
        landmark_regularisation_weight(-1)


def test_regularisation_mse_by_hand():
    coords = torch.tensor([[[0.0, 0.0], [111.0, 55.5]]], requires_grad=True)
    reference = torch.tensor([[[11.1, 0.0], [111.0, 0.0]]], requires_grad=True)
    # / 111: (0, 0), (1, 0.5) vs (0.1, 0), (1, 0): squared differences 0.01, 0, 0, 0.25 -> mean 0.065.
    loss = landmark_regularisation(coords, reference, 112)
    torch.testing.assert_close(loss, torch.tensor(0.065))
    loss.backward()
    # d/dcoords = 2 * (c - r) / 111 / 4 / 111: entry (0, 0) -> 2 * (-0.1) / 4 / 111 = -4.5045e-4.
    torch.testing.assert_close(coords.grad[0, 0, 0], torch.tensor(-0.2 / 4 / 111))
    assert reference.grad is None  # the frozen copy's landmarks are a constant target
    with pytest.raises(ValueError, match="landmark shapes differ"):
        landmark_regularisation(coords, reference[:, :1], 112)


# ---------------------------------------------------------------------------------------------------------------- #
# Figures


def test_landmark_figures(tmp_path):
    images = ramp_image(2) / 3000.0  # de-normalised, in [0, 1]
    coords = centred_coords().expand(2, 16, 2)
    true_points = torch.tensor([[[4.0, 5.0], [11.0, 5.0], [8.0, 8.0], [5.0, 12.0], [10.0, 12.0]]]).expand(2, 5, 2)
    out = plot_landmarks(images, coords, tmp_path / "landmarks.png", true_points)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 100
    out = plot_landmarks((images * 255).to(torch.uint8), coords, tmp_path / "landmarks_uint8.png")
    assert out.is_file()
    mosaic = landmark_mosaic(images, coords, P)
    out = plot_mosaic(images[0], mosaic[0], tmp_path / "mosaic.png", patch=P)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height
    with pytest.raises(ValueError, match="undo the normalisation"):
        plot_landmarks(images * 4 - 2, coords, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="true_points must be"):
        plot_landmarks(images, coords, tmp_path / "bad.png", true_points[:1])
    with pytest.raises(ValueError, match="not made of 5 px tiles"):
        plot_mosaic(images[0], mosaic[0], tmp_path / "bad.png", patch=5)
