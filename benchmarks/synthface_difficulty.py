"""SynthFaces generation speed and difficulty.

Renders a SynthFaces set in one process (after a small warm-up run), reports images per second, then the
test-vs-train 1-nearest-neighbour identification accuracy on raw pixels (32x32 RGB, L2), which must stay well
below what a trained network reaches (the default 100-identity set is tuned to 15-35 %). The results dict, with
library versions and the machine, is logged and written as JSON.

Usage: ``python -m benchmarks.synthface_difficulty --ids 100 --train-per-id 20 --test-per-id 5 --output out.json``
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from benchmarks.common import cli_main, save_results, setup
from benchmarks.pixel_nearest_neighbour import pixel_nearest_neighbour_accuracy
from data_loader.synthface import GENERATOR_VERSION, generate_synthfaces, synthface_parameters

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description="SynthFaces generation speed and pixel 1-NN difficulty.")
    parser.add_argument("--ids", type=int, default=100, help="number of identities (default: 100)")
    parser.add_argument("--train-per-id", type=int, default=20, help="training images per identity (default: 20)")
    parser.add_argument("--test-per-id", type=int, default=5, help="test images per identity (default: 5)")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default: 112)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument("--nuisance", type=float, default=1.0, help="nuisance strength (default: 1.0)")
    parser.add_argument("--nn-size", type=int, default=32, help="side images are resized to for 1-NN (default: 32)")
    parser.add_argument("--warmup-ids", type=int, default=2, help="identities rendered before timing (default: 2)")
    parser.add_argument(
        "--data-dir", default=None, help="keep the rendered set in this new folder (default: a temporary folder)"
    )
    parser.add_argument(
        "--output",
        default="output/synthface_difficulty.json",
        help="results JSON (default: output/synthface_difficulty.json)",
    )
    return parser


def run_benchmark(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Times a single-process render of the set into `work_dir`/data and measures its pixel 1-NN accuracy.

    Args:
        args: parsed command-line arguments.
        work_dir: scratch folder for the warm-up set (and the data set unless --data-dir is given).

    Returns:
        The results dict.
    """
    params = synthface_parameters(
        ids=args.ids,
        train_per_id=args.train_per_id,
        test_per_id=args.test_per_id,
        size=args.size,
        seed=args.seed,
        nuisance=args.nuisance,
    )
    if args.nn_size < 1:
        raise ValueError(f"--nn-size must be an integer >= 1, got {args.nn_size}")
    warm = dict(params, ids=max(1, args.warmup_ids), seed=args.seed + 1)
    generate_synthfaces(work_dir / "warmup", workers=1, progress=False, **warm)
    data_dir = Path(args.data_dir) if args.data_dir else work_dir / "data"
    start = time.perf_counter()
    meta = generate_synthfaces(data_dir, workers=1, progress=False, **params)
    elapsed = time.perf_counter() - start
    images = meta["counts"]["images"]
    logger.info("rendered %d images in %.2f s on one core: %.1f images/s", images, elapsed, images / elapsed)
    start = time.perf_counter()
    accuracy = pixel_nearest_neighbour_accuracy(data_dir, size=args.nn_size)
    logger.info(
        "pixel 1-NN (%dx%d RGB, L2) test-vs-train accuracy on %d identities: %.4f (chance %.4f, %.1f s)",
        args.nn_size,
        args.nn_size,
        args.ids,
        accuracy,
        1.0 / args.ids,
        time.perf_counter() - start,
    )
    return dict(
        benchmark="synthface_difficulty",
        parameters=params,
        generator_version=GENERATOR_VERSION,
        images=images,
        seconds=round(elapsed, 3),
        images_per_second=round(images / elapsed, 1),
        pixel_nn_size=args.nn_size,
        pixel_nn_accuracy=accuracy,
        chance=1.0 / args.ids,
        versions=dict(python=platform.python_version(), numpy=np.__version__, pillow=PIL.__version__),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count()),
    )


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark in a scratch folder; logs the results and writes them to --output."""
    setup(threads=None)
    if args.data_dir and Path(args.data_dir).exists():
        raise FileExistsError(f"--data-dir {args.data_dir} already exists; expected a new folder")
    with tempfile.TemporaryDirectory(prefix="synthface_bench_") as tmp:
        results = run_benchmark(args, Path(tmp))
    save_results(results, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(get_args_parser(), main, errors=(ValueError, FileExistsError)))
