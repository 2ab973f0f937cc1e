#!/usr/bin/env python3
"""Embeddings of every train and test image of a benchmark with a trained FaceGCD or recognition checkpoint.

Described in docs/method.md, section 10.

Writes ``<save_dir>/<experiment>/features_{train,test}.pt`` (L2-normalised CLS features of the prefixed backbone,
fixed evaluation prompt; or the L2-normalised embeddings of a ``--method recognition`` checkpoint), rows in ``uq_idx``
order, no padded duplicates, and ``extraction.json``.

    python extract_features.py --dataset synthfaces_tiny --checkpoint-weights output/train/run/model_best.pth.tar \
        --save-dir results --experiment run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.args import (
    add_checkpoint_data_args,
    add_compat_args,
    add_data_args,
    add_runtime_args,
    image_size_from_args,
    log_ignored_flags,
    parse_recording_explicit,
)
from trainer.cli import DEFAULT_METHOD, add_checkpoint_model_args
from trainer.data import (
    DataConfigError,
    apply_data_config,
    check_listing,
    data_config,
    load_datasets,
    take_input_preset,
)
from trainer.features import embed_dataset
from trainer.methods import get_method, method_of_checkpoint
from trainer.precision import resolve_precision
from utils.checkpoint import CheckpointError, atomic_save, atomic_write_text, load_checkpoint
from utils.cli_errors import exit_code
from utils.config import hide_alias_spellings
from utils.distributed import cleanup, get_rank, get_world_size, init_distributed, is_primary
from utils.logging import setup_logging
from utils.output_sets import OUTPUT_ID_KEY, move_aside, new_output_id, refuse_complete_output, withdraw_manifest
from utils.presets import GCD_PRESET
from utils.report import EXTRACTION_MANIFEST, SSK_SUBDIR
from utils.run_lock import RunLock

logger = logging.getLogger("extract_features")

# Command-line flags that describe the architecture; the checkpoint's model_config wins over them.
ARCH_FLAGS = (
    "arch",
    "patch_size",
    "depth",
    "prefix_length",
    "layer_embed",
    "initializer",
    "head_out_dim",
    "hypernet_hidden_dim",
)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The extraction parser (its data, model and runtime groups are the training ones)."""
    parser = argparse.ArgumentParser(
        prog="extract_features.py",
        description="Embeddings of every train and test image of a benchmark with a trained checkpoint of any method "
        "that embeds images (the method and the data settings are read from the checkpoint).",
        add_help=add_help,
        allow_abbrev=False,
    )
    parser.add_argument("-c", "--config", default="", help="YAML file whose keys set parser defaults (default: none)")
    add_data_args(parser)
    add_checkpoint_data_args(parser)
    add_checkpoint_model_args(parser)
    add_runtime_args(parser)
    group = parser.add_argument_group("Extraction")
    group.add_argument(
        "--checkpoint-weights",
        "--checkpoint_weights",
        dest="checkpoint_weights",
        default=None,
        help="trained checkpoint (model_best.pth.tar) (default: none: the untrained model is used)",
    )
    group.add_argument(
        "--save-dir",
        "--save_dir",
        dest="save_dir",
        default="results",
        help="output root; features go to <save_dir>/<experiment>/ (default: results)",
    )
    group.add_argument(
        "--features",
        choices=("model", "pixels"),
        default="model",
        help="model = prefixed-backbone CLS; pixels = raw-pixel baseline (16x16 RGB) (default: model)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a complete earlier extraction in the folder (its SSK results are moved aside) (default: off)",
    )
    group.add_argument("--save-images", action="store_true", help=argparse.SUPPRESS)
    group.add_argument(
        "--unsafe-load", action="store_true", help="load checkpoints with weights_only=False (only for files you trust)"
    )
    add_compat_args(parser)
    return hide_alias_spellings(parser)


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Any, dict]:
    """Build the model of ``--checkpoint-weights`` with its registered method (the checkpoint's ``model_config``
    wins over disagreeing flags), or the untrained FaceGCD model of the flags without a checkpoint.

    Returns:
        The model in eval mode, its config and a description of where it came from.
    """
    weights_only = not args.unsafe_load
    if not args.checkpoint_weights:
        start = f"the backbone of {args.pretrained_weights}" if args.pretrained_weights else "a random backbone"
        logger.warning(
            "no --checkpoint-weights: extracting with an untrained FaceGCD model on %s (a baseline, seeded by --seed)",
            start,
        )
        torch.manual_seed(args.seed)
        model = get_method(DEFAULT_METHOD).untrained_model(args)
        return model.to(device).eval(), model.cfg, {"checkpoint": None}
    ckpt = load_checkpoint(args.checkpoint_weights, weights_only=weights_only, mmap=True)
    method = method_of_checkpoint(ckpt, args.checkpoint_weights)
    model = method.load_for_embedding(ckpt, args.checkpoint_weights, weights_only=weights_only, flags=args)
    config = model.cfg
    explicit = explicit_flags(args)
    for flag in ARCH_FLAGS:
        if flag in explicit and hasattr(config, flag) and getattr(args, flag) != getattr(config, flag):
            logger.warning(
                "--%s %s disagrees with the checkpoint's %s; the checkpoint wins",
                flag.replace("_", "-"),
                getattr(args, flag),
                getattr(config, flag),
            )
    _check_front_end(args, bool(getattr(config, "landmark_cnn", False)))
    stored_data = ckpt.get("data_config") or {}
    source = {
        "checkpoint": str(args.checkpoint_weights),
        "epoch": ckpt.get("epoch"),
        "input_preset": stored_data.get("input_preset", GCD_PRESET),  # files before presets used the gcd one
    }
    if stored_data.get("train_set") == "all":
        if not {"dataset", "data_path"} & explicit:
            raise DataConfigError(
                f"{args.checkpoint_weights} was trained on a whole identity set ({stored_data.get('dataset')} at "
                f"{stored_data.get('data_path')}), not on a GFD benchmark, so it names no benchmark to extract: pass "
                "--dataset and --data-path of the benchmark whose images to embed"
            )
        logger.info(
            "%s was trained on a whole identity set: --dataset %s chooses the benchmark",
            args.checkpoint_weights,
            args.dataset,
        )
    else:
        source["data_config"] = ckpt.get("data_config")
    return model.to(device).eval(), config, source


def _check_front_end(args: argparse.Namespace, trained_with: bool) -> None:
    """``--landmark-cnn`` must match the checkpoint: the front end changes what every patch token sees."""
    if bool(getattr(args, "landmark_cnn", False)) != trained_with:
        state = "has the landmark front end" if trained_with else "was trained without the landmark front end"
        fix = "add --landmark-cnn" if trained_with else "drop --landmark-cnn"
        raise CheckpointError(f"{args.checkpoint_weights} {state} (--landmark-cnn); {fix}")


def explicit_flags(args: argparse.Namespace) -> set[str]:
    """Destinations set on the command line (recorded by ``main``), else those differing from the parser defaults."""
    recorded = getattr(args, "explicit_flags", None)
    if recorded is not None:
        return set(recorded)
    defaults = vars(get_args_parser(add_help=False).parse_args([]))
    return {dest for dest, value in vars(args).items() if dest in defaults and value != defaults[dest]}


def _describe_data(stored: dict) -> str:
    keys = ("dataset", "data_path", "prop_train_labels", "split_seed", "num_known", "image_size", "input_preset")
    return ", ".join(f"{k}={stored[k]}" for k in keys if k in stored)


def pixel_features(images: torch.Tensor, side: int = 16) -> torch.Tensor:
    """Raw-pixel baseline: the normalised image average-pooled to side x side, flattened, L2-normalised."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), side).flatten(1)
    return torch.nn.functional.normalize(pooled, dim=1)


def compute_split_features(args: argparse.Namespace, device: torch.device | None = None) -> dict[str, dict]:
    """Features of the train and test splits, in the format ``extract_features.py`` writes.

    Returns:
        ``{"train": {...}, "test": {...}}``; every rank returns the full, gathered splits.
    """
    device = device if device is not None else init_distributed(args.device)
    precision = resolve_precision(args.amp, args.amp_impl, args.amp_dtype, device)
    if args.features == "pixels":
        image_size = image_size_from_args(args)
        embed_fn, config, source = pixel_features, None, {"checkpoint": None}
    else:
        model, config, source = load_model(args, device)
        image_size, embed_fn = config.img_size, model.extract_features
    stored = source.get("data_config")
    if stored:
        explicit = explicit_flags(args)
        given_size = image_size_from_args(args) if "input_size" in explicit else None
        apply_data_config(args, stored, explicit, source["checkpoint"], given_size)
        logger.info("data settings from %s: %s", source["checkpoint"], _describe_data(stored))
    take_input_preset(args, source.get("input_preset"), explicit_flags(args), source["checkpoint"])
    datasets = load_datasets(args, image_size)
    if stored:
        check_listing(datasets, stored, source["checkpoint"])
    splits = {"train": datasets.train_eval, "test": datasets.test_eval}
    out: dict[str, dict] = {}
    settings = data_config(args, datasets, image_size)
    for split, dataset in splits.items():
        start = time.perf_counter()
        feats = embed_dataset(
            embed_fn,
            dataset,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            autocast=precision.autocast(),
            desc=f"extract {split}",
        )
        labelled = (
            datasets.labelled_mask[feats.uq_idx]
            if split == "train"
            else torch.zeros_like(feats.labels, dtype=torch.bool)
        )
        out[split] = {
            "features": feats.features.float().contiguous(),
            "labels": feats.labels,
            "uq_idx": feats.uq_idx,
            "known_mask": feats.labels < datasets.num_known,
            "labelled_mask": labelled,
            "meta": {
                "dataset": args.dataset,
                "split": split,
                "seed": args.seed,
                "prop_train_labels": args.prop_train_labels,
                "split_seed": args.split_seed,
                "data_config": settings,
                "num_known": datasets.num_known,
                "num_classes": datasets.num_classes,
                "checkpoint": source["checkpoint"],
                "features": args.features,
                "model_config": config.to_dict() if config is not None else None,
                **precision.to_dict(),
                "world_size": get_world_size(),
                "seconds": time.perf_counter() - start,
            },
        }
        logger.info("%s: %d x %d features", split, *out[split]["features"].shape)
    return out


def write_feature_set(save_dir: Path, features: dict[str, dict], overwrite: bool) -> None:
    """Write ``features_{train,test}.pt`` and, last, their manifest ``extraction.json``, all with one output id
    (``utils.output_sets``). Replacing a set withdraws its manifest first and moves the SSK results computed from it
    (``ssk/``) aside."""
    manifest = save_dir / EXTRACTION_MANIFEST
    if manifest.exists():
        withdraw_manifest(manifest)
        move_aside(save_dir / SSK_SUBDIR, "SSK results of the features being replaced")
    output_id = new_output_id()
    for split, payload in features.items():
        payload["meta"][OUTPUT_ID_KEY] = output_id
        atomic_save(payload, save_dir / f"features_{split}.pt")
    description = {split: dict(payload["meta"], rows=len(payload["uq_idx"])) for split, payload in features.items()}
    description[OUTPUT_ID_KEY] = output_id
    atomic_write_text(manifest, json.dumps(description, indent=2, default=str))
    logger.info("wrote %s", ", ".join(str(save_dir / f"features_{s}.pt") for s in features))


def main(args: argparse.Namespace) -> int:
    """Extract and write the features; bad input ends with one error message and exit code 2.

    The features folder is locked for the run (``utils.run_lock``); a folder holding a complete extraction is
    refused unless ``--overwrite`` is given.
    """
    device = init_distributed(args.device)
    save_dir = Path(args.save_dir) / (args.experiment or "features")

    def locked_run() -> int:
        refuse_complete_output(save_dir / EXTRACTION_MANIFEST, args.overwrite, "features")
        with RunLock(save_dir, "features folder") if is_primary() else contextlib.nullcontext():
            setup_logging(save_dir if is_primary() else None, rank=get_rank())
            log_ignored_flags(args)
            features = compute_split_features(args, device)
            if is_primary():
                write_feature_set(save_dir, features, args.overwrite)
        return 0

    try:
        return exit_code(locked_run, logger)
    finally:
        cleanup()


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: parse ``argv`` (default: ``sys.argv[1:]``), remember which flags it set, extract."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    return exit_code(lambda: main(parse_recording_explicit(get_args_parser, argv)), logger)


if __name__ == "__main__":
    sys.exit(cli())
