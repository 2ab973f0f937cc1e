"""Pixel 1-nearest-neighbour identification accuracy of an identity-folder data set: a difficulty measure.

Every image is resized to ``--size`` x ``--size`` RGB (bilinear) and flattened; each test image takes the identity of
its nearest training image (L2). The fraction of test images given their own identity says how much raw appearance
alone gives away (chance is 1 / identities): SynthFaces is tuned to stay far below what a trained network reaches
(``benchmarks.synthface_difficulty`` renders a set and reports this figure with the generation speed).

Usage: ``python -m benchmarks.pixel_nearest_neighbour --data-path DIR --size 32 --output pixel_nn.json``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from benchmarks.common import cli_main, environment, resolve_device, save_results, setup

logger = logging.getLogger(__name__)


def _load_split(root: Path, split: str, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened `size` x `size` RGB pixels (N, 3 size^2) and class indices (N,) of root/split/<class>/*.jpg."""
    feats, labels = [], []
    for label, name in enumerate(classes):
        folder = root / split / name
        if not folder.is_dir():
            raise FileNotFoundError(f"pixel 1-NN: missing identity folder {folder}; expected {root}/<split>/<id>/")
        for file in sorted(folder.glob("*.jpg")):
            with Image.open(file) as img:
                small = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            feats.append(np.asarray(small, dtype=np.float32).ravel())
            labels.append(label)
    return np.stack(feats), np.asarray(labels)


def pixel_nearest_neighbour_accuracy(root: str | os.PathLike, size: int = 32) -> float:
    """Test-vs-train identification accuracy of 1-nearest-neighbour on raw pixels.

    Each image is resized to `size` x `size` RGB, flattened, and matched by L2 distance to the training images.

    Args:
        root: a folder with the train/<id>/*.jpg and test/<id>/*.jpg layout.
        size: side the images are resized to before matching.

    Returns:
        Fraction of test images whose nearest training image has the same identity.
    """
    if size < 1:
        raise ValueError(f"pixel_nearest_neighbour_accuracy: size must be >= 1, got {size}")
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"pixel 1-NN: {train_dir} not found; expected {root}/train/<id>/*.jpg")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    train_x, train_y = _load_split(root, "train", classes, size)
    test_x, test_y = _load_split(root, "test", classes, size)
    sq_train = (train_x.astype(np.float64) ** 2).sum(1)
    dist = sq_train[None, :] - 2.0 * test_x.astype(np.float64) @ train_x.T.astype(np.float64)
    return float((train_y[dist.argmin(1)] == test_y).mean())


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description="Pixel 1-nearest-neighbour accuracy of an identity-folder set.")
    parser.add_argument("--data-path", required=True, help="folder holding train/<id>/*.jpg and test/<id>/*.jpg")
    parser.add_argument("--size", type=int, default=32, help="side images are resized to (default: 32)")
    parser.add_argument("--output", default=None, help="also write the JSON results to this file (default: none)")
    return parser


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measures the pixel 1-NN accuracy of ``args.data_path`` at ``args.size`` pixels.

    Args:
        args: parsed command-line arguments.

    Returns:
        The results dict: accuracy, chance, number of identities and seconds taken.
    """
    start = time.perf_counter()
    accuracy = pixel_nearest_neighbour_accuracy(args.data_path, size=args.size)
    seconds = time.perf_counter() - start
    identities = sum(1 for p in (Path(args.data_path) / "train").iterdir() if p.is_dir())
    logger.info(
        "pixel 1-NN (%dx%d RGB, L2) test-vs-train accuracy on %d identities: %.4f (chance %.4f, %.1f s)",
        args.size,
        args.size,
        identities,
        accuracy,
        1.0 / identities,
        seconds,
    )
    return dict(accuracy=accuracy, chance=1.0 / identities, identities=identities, seconds=round(seconds, 3))


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark; logs the results (arguments, environment, accuracy) and writes them to --output."""
    setup(threads=None)
    env = environment(resolve_device("cpu"), {"numpy": np.__version__, "pillow": PIL.__version__})
    save_results({"args": vars(args), "environment": env, "results": run_benchmark(args)}, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(get_args_parser(), main, errors=(ValueError, FileNotFoundError)))
