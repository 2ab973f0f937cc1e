#!/usr/bin/env python3
"""Face verification of a trained checkpoint on pair sets and IJB-style benchmarks (docs/verification.md).

Targets are insightface ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW: 10-fold accuracy, VAL@FAR 1e-3) and
IJB-B/C folders (``meta/`` + ``loose_crop/``: TAR@FAR 1e-6 ... 1e-1, a table and a ROC curve per benchmark). The
checkpoint may come from any registered method that embeds images (recognition; FaceGCD: its prefixed ViT's CLS
features), or be an insightface arcface_torch ``backbone.pth`` (IResNet-18/34/50/100), scored on insightface's input.
A FaceCoresetNet checkpoint (``--method coreset``) embeds with the recognizer its configuration records (path and
SHA-256 checked) and pools IJB templates with its aggregator too, beside insightface's modes (docs/coreset.md).
Results go to ``<checkpoint's folder>/verify/<checkpoint stem>/`` unless ``--output`` names a folder, so two checkpoints
never overwrite each other's results.

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

import torch

from model.iresnet import load_arcface_torch_backbone
from photos.compare import add_photo_args, compare_photos
from trainer.engine import evaluate_verification
from trainer.methods import method_of_checkpoint
from trainer.precision import resolve_precision
from utils.checkpoint import atomic_write_text, load_checkpoint
from utils.cli_errors import exit_code
from utils.config import hide_alias_spellings, parse_args_with_config
from utils.distributed import init_distributed
from utils.logging import setup_logging
from utils.output_sets import refuse_complete_output, withdraw_manifest
from utils.presets import FACE_PRESET, GCD_PRESET
from utils.run_lock import RunLock

logger = logging.getLogger("verify")

RESULTS_FILE = "results.json"


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
    parser.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help=".bin pair sets and IJB folders (default: none; required unless --photos)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder of results.json, tables and ROC PNGs (default: <checkpoint folder>/verify/<checkpoint stem>)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the complete results of an earlier verification in the output folder (default: off)",
    )
    parser.add_argument(
        "--recognizer",
        default=None,
        help="a FaceCoresetNet checkpoint's recognizer when its file moved: it must be the recorded file (same "
        "SHA-256) (default: the path the checkpoint records)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: %(default)s)")
    parser.add_argument(
        "-j", "--workers", type=int, default=4, help="DataLoader worker processes for IJB images (default: %(default)s)"
    )
    parser.add_argument(
        "--exact-roc",
        action="store_true",
        help="IJB TAR@FAR on the exact ROC instead of insightface's thinned one (sklearn's drop_intermediate) "
        "(default: off)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action="store_true", help="autocast the forward passes (default: off)")
    parser.add_argument(
        "--amp-dtype",
        choices=("float16", "bfloat16"),
        default=None,
        help="autocast dtype (default: float16 on CUDA, bfloat16 on the CPU)",
    )
    parser.add_argument(
        "--unsafe-load", action="store_true", help="load the checkpoint with weights_only=False (default: off)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (default: bars on)")
    add_photo_args(parser)
    return hide_alias_spellings(parser)


class ArcFaceTorchBackbone(torch.nn.Module):
    """An insightface arcface_torch ``backbone.pth`` (a bare IResNet state dict) as the protocols call a model."""

    def __init__(self, path: str, weights_only: bool) -> None:
        super().__init__()
        self.net = load_arcface_torch_backbone(path, weights_only=weights_only)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's embeddings (B, E), not normalised, of face-preset images."""
        return self.net(images)


def is_arcface_torch_backbone(ckpt: dict) -> bool:
    """A bare arcface_torch state dict: ``fc.weight`` and tensors only, no training-checkpoint entries."""
    return "fc.weight" in ckpt and all(isinstance(value, torch.Tensor) for value in ckpt.values())


def load_model(path: str, weights_only: bool, recognizer: str | None = None) -> tuple[torch.nn.Module, int, str]:
    """The checkpoint's model, rebuilt by its registered method, its input size and its input preset (``gcd`` for
    files written before presets were stored). An arcface_torch ``backbone.pth`` is scored as insightface scores it:
    the whole aligned crop, ``face`` preset. ``recognizer`` replaces the recognizer path a checkpoint records (a
    template aggregator's); the method still checks that it is the recorded file."""
    ckpt = load_checkpoint(path, weights_only=weights_only, mmap=True)
    if recognizer is not None:
        stored = (ckpt.get("model_config") or {}).get("recognizer")
        if not isinstance(stored, dict):
            raise ValueError(f"--recognizer: {path} records no recognizer (only template aggregator checkpoints do)")
        stored["path"] = str(Path(recognizer).resolve())
    if is_arcface_torch_backbone(ckpt):
        model = ArcFaceTorchBackbone(path, weights_only)
        return model, model.net.img_size, FACE_PRESET
    model = method_of_checkpoint(ckpt, path).load_for_embedding(ckpt, path, weights_only=weights_only)
    preset = (ckpt.get("data_config") or {}).get("input_preset", GCD_PRESET)
    return model, model.cfg.img_size, preset


def output_dir(args: argparse.Namespace) -> Path:
    """``--output``, else ``<checkpoint folder>/verify/<checkpoint stem>`` (the run folder of a training
    checkpoint; ``last.pth.tar`` -> ``last``)."""
    if args.output:
        return Path(args.output)
    checkpoint = Path(args.checkpoint_weights)
    stem = checkpoint.name.split(".")[0] or checkpoint.name
    return checkpoint.parent / "verify" / stem


def main(args: argparse.Namespace) -> int:
    """Score every target into the locked output folder, or compare ``--photos``; bad input ends with one error
    message and exit code 2."""
    if args.photos:
        if args.targets:
            logger.error("give --targets or --photos, not both")
            return 2
        return exit_code(lambda: compare_photos(args), logger)
    if not args.targets:
        logger.error("give --targets (pair sets, IJB folders) or --photos A B")
        return 2
    return exit_code(lambda: _verify(args), logger)


def _verify(args: argparse.Namespace) -> int:
    """:func:`main`'s work."""
    for target in args.targets:
        if not (Path(target).is_dir() or (Path(target).suffix == ".bin" and Path(target).is_file())):
            raise ValueError(f"--targets {target}: expected an existing .bin pair set or IJB folder")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    out = output_dir(args)
    refuse_complete_output(out / RESULTS_FILE, args.overwrite, "verification results")
    model, image_size, preset = load_model(args.checkpoint_weights, not args.unsafe_load, args.recognizer)
    with RunLock(out, "verification folder"):
        setup_logging(out)
        withdraw_manifest(out / RESULTS_FILE)
        device = init_distributed(args.device)
        precision = resolve_precision(args.amp, "native", args.amp_dtype, device)
        logger.info("%s: %d px, input preset %s", args.checkpoint_weights, image_size, preset)
        results = evaluate_verification(
            model.to(device),
            args.targets,
            image_size=image_size,
            device=device,
            precision=precision,
            batch_size=args.batch_size,
            num_workers=args.workers,
            exact_roc=args.exact_roc,
            input_preset=preset,
            output_dir=out,
            progress=not args.no_progress,
        )
        for target, scores in results.items():
            logger.info("%s: %s", target, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        record = {
            "checkpoint": str(args.checkpoint_weights),
            "image_size": image_size,
            "input_preset": preset,
            "exact_roc": args.exact_roc,
            "results": results,
        }
        atomic_write_text(out / RESULTS_FILE, json.dumps(record, indent=2))
        logger.info("wrote %s", out / RESULTS_FILE)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line (``-c/--config`` YAML defaults as in the other scripts): bad input ends with one error message
    and exit code 2."""
    setup_logging()
    try:
        args = parse_args_with_config(get_args_parser(), argv)
    except (ValueError, OSError) as err:  # an unreadable -c/--config file
        logger.error("%s", err)
        return 2
    return main(args)


if __name__ == "__main__":
    sys.exit(cli())
