#!/usr/bin/env python3
"""Face verification of a trained checkpoint on pair sets and IJB-style benchmarks (docs/verification.md).

Targets are insightface ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW: 10-fold accuracy, VAL@FAR 1e-3) and
IJB-B/C folders (``meta/`` + ``loose_crop/``: TAR@FAR 1e-6 ... 1e-1, a table and a ROC curve per benchmark). The
checkpoint may come from any registered method that embeds images (recognition; FaceGCD: its prefixed ViT's CLS
features). Results go to ``<checkpoint's folder>/verify/<checkpoint stem>/`` unless ``--output`` names a folder, so two
checkpoints never overwrite each other's results.

    python verify.py --checkpoint-weights output/train/arc/last.pth.tar --targets data/lfw.bin data/IJBB
    # -> output/train/arc/verify/last/ (results.json, IJB tables and ROC curves)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from data_loader import DatasetError
from trainer.engine import evaluate_verification
from trainer.methods import method_of_checkpoint
from trainer.precision import resolve_precision
from utils.checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from utils.config import hide_alias_spellings
from utils.distributed import init_distributed
from utils.logging import setup_logging

logger = logging.getLogger("verify")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The verification parser."""
    parser = argparse.ArgumentParser(
        prog="verify.py",
        description="Face verification of a trained checkpoint on insightface .bin pair sets and IJB-style folders.",
        add_help=add_help,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--checkpoint-weights",
        "--checkpoint_weights",
        dest="checkpoint_weights",
        required=True,
        help="trained checkpoint (last.pth.tar, model_best.pth.tar, checkpoint-N.pth.tar)",
    )
    parser.add_argument("--targets", nargs="+", required=True, help=".bin pair sets and IJB folders")
    parser.add_argument(
        "--output",
        default=None,
        help="folder of results.json, tables and ROC PNGs (default: <checkpoint folder>/verify/<checkpoint stem>)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action="store_true", help="autocast the forward passes")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None, help="autocast dtype")
    parser.add_argument("--unsafe-load", action="store_true", help="load the checkpoint with weights_only=False")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return hide_alias_spellings(parser)


def load_model(path: str, weights_only: bool):
    """The checkpoint's model, rebuilt by its registered method, and its input size."""
    ckpt = load_checkpoint(path, weights_only=weights_only, mmap=True)
    model = method_of_checkpoint(ckpt, path).load_for_embedding(ckpt, path, weights_only=weights_only)
    return model, model.cfg.img_size


def output_dir(args: argparse.Namespace) -> Path:
    """``--output``, else ``<checkpoint folder>/verify/<checkpoint stem>`` (the run folder of a training
    checkpoint; ``last.pth.tar`` -> ``last``)."""
    if args.output:
        return Path(args.output)
    checkpoint = Path(args.checkpoint_weights)
    stem = checkpoint.name.split(".")[0] or checkpoint.name
    return checkpoint.parent / "verify" / stem


def main(args: argparse.Namespace) -> int:
    """Score every target; returns the exit code."""
    for target in args.targets:
        if not (Path(target).is_dir() or (Path(target).suffix == ".bin" and Path(target).is_file())):
            raise ValueError(f"--targets {target}: expected an existing .bin pair set or IJB folder")
    model, image_size = load_model(args.checkpoint_weights, weights_only=not args.unsafe_load)
    out = output_dir(args)
    setup_logging(out)
    device = init_distributed(args.device)
    precision = resolve_precision(args.amp, "native", args.amp_dtype, device)
    results = evaluate_verification(
        model.to(device),
        args.targets,
        image_size=image_size,
        device=device,
        precision=precision,
        batch_size=args.batch_size,
        output_dir=out,
        progress=not args.no_progress,
    )
    for target, scores in results.items():
        logger.info("%s: %s", target, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    record = {"checkpoint": str(args.checkpoint_weights), "image_size": image_size, "results": results}
    atomic_write_text(out / "results.json", json.dumps(record, indent=2))
    logger.info("wrote %s", out / "results.json")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: bad input ends with one error message and exit code 2."""
    setup_logging()
    try:
        return main(get_args_parser().parse_args(argv))
    except (ValueError, FileNotFoundError, CheckpointError, DatasetError) as err:
        logging.getLogger("verify").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
