"""Photos that ship in packages, for the detection, alignment and discovery tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_cli

GRACE_HOPPER = Path("/usr/share/doc/facedetect/examples/grace_hopper_512x512.jpg")


def skimage_data() -> Path:
    """scikit-image's data folder (found without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    assert spec is not None, "scikit-image is not installed (requirements.txt): its astronaut and lfw_subset are needed"
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """scikit-image's 512 x 512 ``astronaut`` (Eileen Collins, NASA, public domain)."""
    return Image.open(skimage_data() / "astronaut.png").convert("RGB")


@pytest.fixture(scope="session")
def lfw_faces() -> list[Image.Image]:
    """The first eight 25 x 25 grey LFW faces of scikit-image's ``lfw_subset``, upscaled to 160 x 160 RGB."""
    faces = np.load(skimage_data() / "lfw_subset.npy")[:8]
    return [Image.fromarray((f * 255).round().astype(np.uint8)).convert("RGB").resize((160, 160), 3) for f in faces]


@pytest.fixture(scope="session")
def grace_hopper() -> Image.Image:
    """Debian's facedetect example photo (Grace Hopper, public domain); skipped where the package is absent."""
    if not GRACE_HOPPER.is_file():
        pytest.skip(f"{GRACE_HOPPER} is not installed (apt-get install facedetect)")
    return Image.open(GRACE_HOPPER).convert("RGB")


@pytest.fixture(scope="session")
def non_face() -> Image.Image:
    """scikit-image's ``coffee`` (a cup of coffee: no face)."""
    return Image.open(skimage_data() / "coffee.png").convert("RGB")


@pytest.fixture(scope="session")
def mtcnn():
    """The default MTCNN detector on the CPU (module weights from facenet-pytorch)."""
    from photos.mtcnn import MTCNN

    return MTCNN()


@pytest.fixture(scope="session")
def checkpoint(tiny_faces, tmp_path_factory) -> Path:
    """IResNet-18 at 32 px, ArcFace on all 8 identities of the tiny preset's train split, 8 epochs (~10 s)."""
    out = tmp_path_factory.mktemp("discover_ckpt")
    args = ["--method", "recognition", "--dataset", "recognition_folders", "--data-path", f"{tiny_faces}/train"]
    args += ["--arch", "iresnet18", "--input-size", "3", "32", "32", "--embedding-size", "64", "--batch-size", "8"]
    args += ["--workers", "0", "--seed", "3", "--opt", "sgd", "--lr", "0.1", "--weight-decay", "5e-4"]
    args += ["--warmup-epochs", "0", "--epochs", "8", "--output", str(out), "--experiment", "arc", "--no-progress"]
    run_cli("train.py", args)
    return out / "arc" / "last.pth.tar"
