#!/usr/bin/env python3
"""Face verification of a trained checkpoint on pair sets and IJB-style benchmarks (docs/verification.md).

Targets are insightface ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW: 10-fold accuracy, VAL@FAR 1e-3) and
IJB-B/C folders (``meta/`` + ``loose_crop/``: TAR@FAR 1e-6 ... 1e-1, a table and a ROC curve per benchmark). The
checkpoint may come from ``--method recognition`` or from FaceGCD (its prefixed ViT's CLS features).

    python verify.py --checkpoint_weights output/train/arc/last.pth.tar --targets data/lfw.bin data/IJBB \
        --output results/verify/arc
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from data_loader import DatasetError
from model.facegcd import ModelConfig, load_facegcd_checkpoint
from model.recognition import checkpoint_method, recognizer_from_checkpoint
from trainer.engine import evaluate_verification
from trainer.precision import resolve_precision
from utils.checkpoint import CheckpointError, atomic_write_text
from utils.distributed import init_distributed
from utils.logging import setup_logging

logger = logging.getLogger("verify")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The verification parser."""
    parser = argparse.ArgumentParser("Face verification", add_help=add_help)
    parser.add_argument("--checkpoint_weights", "--checkpoint-weights", dest="checkpoint_weights", required=True)
    parser.add_argument("--targets", nargs="+", required=True, help=".bin pair sets and IJB folders")
    parser.add_argument("--output", default="./results/verify", help="folder of results.json, tables and ROC PNGs")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action="store_true", help="autocast the forward passes")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None, help="autocast dtype")
    parser.add_argument("--unsafe-load", action="store_true", help="load the checkpoint with weights_only=False")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def load_model(path: str, weights_only: bool):
    """The checkpoint's model (recognition or FaceGCD) and its input size."""
    method, ckpt = checkpoint_method(path, weights_only=weights_only)
    if method == "recognition":
        model = recognizer_from_checkpoint(ckpt, path)
    else:
        model, _ = load_facegcd_checkpoint(path, ModelConfig(), weights_only=weights_only)
    return model, model.cfg.img_size


def main(args: argparse.Namespace) -> int:
    """Score every target; returns the exit code."""
    out = Path(args.output)
    setup_logging(out)
    device = init_distributed(args.device)
    precision = resolve_precision(args.amp, "native", args.amp_dtype, device)
    for target in args.targets:
        if not (Path(target).is_dir() or (Path(target).suffix == ".bin" and Path(target).is_file())):
            raise ValueError(f"--targets {target}: expected an existing .bin pair set or IJB folder")
    model, image_size = load_model(args.checkpoint_weights, weights_only=not args.unsafe_load)
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


def _cli() -> int:
    """``main`` for the command line: bad input ends with one error message and exit code 2."""
    try:
        return main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, CheckpointError, DatasetError) as err:
        logging.getLogger("verify").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
