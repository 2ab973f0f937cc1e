#!/usr/bin/env python3
"""Training: FaceGCD, margin-softmax recognition, DINO or LAFS pretraining, or any registered method, in one loop.

A thin command line over ``trainer.loop.train``; ``train.py --method NAME --help`` lists NAME's flags and recipe.

    python train.py --dataset synthfaces_tiny --arch vit_tiny --patch-size 16 --grad-from-block 0 --epochs 2
    python train.py --method recognition --dataset synthfaces_tiny --arch iresnet18 --epochs 2
    torchrun --nproc_per_node=2 train.py --dataset youtubefaces_1000 --data-path youtube_faces_1000 ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from trainer.cli import DEFAULT_METHOD, get_train_parser, parse_train_args
from trainer.loop import train
from utils.cli_errors import exit_code
from utils.logging import setup_logging

logger = logging.getLogger("train")


def get_args_parser(method: str = DEFAULT_METHOD, add_help: bool = True) -> argparse.ArgumentParser:
    """The training parser of ``method`` (reused by tests, wrappers and the CLI reference)."""
    return get_train_parser(method, add_help=add_help)


def cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and train; bad input (flags, files, data, a folder in use) ends
    with one error message and exit status 2."""
    setup_logging()  # console until the run folder is known: errors in the flags are logged too

    def run() -> int:
        args, method = parse_train_args(argv)
        return train(args, method)

    return exit_code(run, logger)


if __name__ == "__main__":
    sys.exit(cli())
