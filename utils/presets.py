"""The input presets (``--input-preset``): how a model's input images are normalised, shared by the data pipeline,
the models that work in pixel space (TransFace's DPAP) and the evaluation embedders.

- ``gcd`` (GCD's and the FaceGCD reference's): ImageNet mean and std.
- ``face`` (insightface's arcface_torch and its evaluation): ``(x / 255 - 0.5) / 0.5``.

The geometry of each preset (resize and crop, or the whole aligned crop) is ``data_loader/transforms.py``'s.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FACE_MEAN = (0.5, 0.5, 0.5)
FACE_STD = (0.5, 0.5, 0.5)
GCD_PRESET, FACE_PRESET = "gcd", "face"
INPUT_PRESETS = (GCD_PRESET, FACE_PRESET)


def preset_normalisation(preset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of an input preset; an unknown name is a ``ValueError`` listing the presets."""
    if preset == GCD_PRESET:
        return IMAGENET_MEAN, IMAGENET_STD
    if preset == FACE_PRESET:
        return FACE_MEAN, FACE_STD
    raise ValueError(f"--input-preset {preset!r}: expected one of {', '.join(INPUT_PRESETS)}")
