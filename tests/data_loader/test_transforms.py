"""The two input presets against values worked out by hand: ``face`` is insightface's (x / 255 - 0.5) / 0.5 of the
whole aligned crop, ``gcd`` GCD's resize-crop with ImageNet statistics; the verification embedder applies the same."""

import numpy as np
import pytest
import torch
from PIL import Image

from data_loader.transforms import EvalTransform, TrainTransform
from trainer.engine import uint8_embedder
from trainer.precision import Precision
from utils.presets import preset_normalisation

# a 2 x 2 RGB image; every channel holds the same values
PIXELS = np.array([[0, 255], [51, 204]], dtype=np.uint8)
# (x / 255 - 0.5) / 0.5: 0 -> -1, 255 -> 1, 51 -> 0.2 * 2 - 1 = -0.6, 204 -> 0.8 * 2 - 1 = 0.6
FACE_VALUES = torch.tensor([[-1.0, 1.0], [-0.6, 0.6]])


def _image() -> Image.Image:
    return Image.fromarray(np.stack([PIXELS] * 3, axis=-1))


def test_face_preset_evaluates_the_whole_crop_as_insightface_does():
    out = EvalTransform(2, "face")(_image())
    assert out.shape == (3, 2, 2)
    for channel in out:
        torch.testing.assert_close(channel, FACE_VALUES)


def test_face_preset_trains_on_the_whole_crop_with_flips_only():
    torch.manual_seed(0)
    seen = {tuple(TrainTransform(2, "face")(_image())[0].flatten().tolist()) for _ in range(40)}
    flipped = FACE_VALUES.flip(-1)
    assert seen == {tuple(FACE_VALUES.flatten().tolist()), tuple(flipped.flatten().tolist())}


def test_gcd_preset_keeps_imagenet_statistics():
    # a uniform grey 255 image: every pixel is 1.0 after ToTensor, whatever the resize and crop
    out = EvalTransform(4, "gcd")(Image.new("RGB", (8, 8), (255, 255, 255)))
    expected = [(1.0 - 0.485) / 0.229, (1.0 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))


def test_an_unknown_preset_names_the_flag():
    with pytest.raises(ValueError, match="--input-preset 'imagenet': expected one of gcd, face"):
        preset_normalisation("imagenet")


class _Identity(torch.nn.Module):
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def test_the_verification_embedder_feeds_the_face_preset_of_the_checkpoint():
    images = torch.from_numpy(np.stack([PIXELS] * 3))[None]  # (1, 3, 2, 2) uint8
    embed = uint8_embedder(_Identity(), 2, torch.device("cpu"), Precision("cpu", None, False, "test"), "face")
    torch.testing.assert_close(embed(images), FACE_VALUES.flatten().repeat(3)[None])
