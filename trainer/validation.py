"""Validation inside training: the clustering sets a method validates on, one validation pass over them and the
``--val-targets``, the checkpoint-selection metric and the ``summary.csv`` row of an epoch."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from data_loader.datasets import GCDDatasets
from trainer.engine import evaluate, evaluate_verification, headline_score
from trainer.precision import Precision

logger = logging.getLogger(__name__)


def clustering_validation(gcd: GCDDatasets | None) -> dict[str, Any]:
    """The validation fields of a ``MethodSetup``: D_U and the test split of a GFD benchmark, or none."""
    if gcd is None:
        return {"eval_sets": {}, "num_classes": 0, "num_known": 0}
    sets = {"unlabelled": gcd.unlabelled_eval, "test": gcd.test_eval}
    return {"eval_sets": sets, "num_classes": gcd.num_classes, "num_known": gcd.num_known}


def validate(
    model: torch.nn.Module,
    setup: Any,
    args: argparse.Namespace,
    device: torch.device,
    precision: Precision,
    epoch: int,
    image_size: int,
    out_dir: Path,
) -> dict:
    """Clustering validation on the method's GFD sets (when it has them) and verification on ``--val-targets``
    (every rank, IJB embedding sharded over them; IJB tables and ROC curves in ``<run>/verification/``), logged per
    set."""
    results: dict = {}
    if setup.eval_sets:
        results = evaluate(
            model,
            setup.eval_sets,
            num_classes=setup.num_classes,
            num_known=setup.num_known,
            device=device,
            precision=precision,
            batch_size=args.batch_size,
            num_workers=args.workers,
            n_init=args.val_kmeans_restarts,
            max_iter=args.val_kmeans_iter,
            seed=args.seed,
            eval_funcs=tuple(args.eval_funcs),
        )
        for set_name, per_variant in results.items():
            for variant, entries in per_variant.items():
                logger.info(
                    "epoch %d %s %s: All %s | Old %s | New %s",
                    epoch,
                    set_name,
                    variant,
                    *(_fmt(entries[e]) for e in ("all", "old", "new")),
                )
    if args.val_targets:  # every rank: IJB embedding is sharded over the ranks
        results["verification"] = evaluate_verification(
            model,
            args.val_targets,
            image_size=image_size,
            device=device,
            precision=precision,
            batch_size=args.batch_size,
            num_workers=args.workers,
            exact_roc=args.exact_roc,
            input_preset=args.input_preset,
            output_dir=out_dir / "verification",
            progress=not args.no_progress,
        )
        for target, scores in results["verification"].items():
            logger.info("epoch %d %s: %s", epoch, target, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return results


def selection_metric(results: dict, args: argparse.Namespace, epoch: int) -> float:
    """First verification target's headline score (pair set: accuracy; IJB: TAR at FAR 1e-4) when there are targets,
    else the clustering selection accuracy, else the epoch (nothing validated: the latest wins)."""
    if results.get("verification"):
        return headline_score(next(iter(results["verification"].values())))
    if "combined" not in results:
        return float(epoch)
    variant = args.eval_funcs[0]
    source = results["combined"] if args.select_on == "combined" else results["unlabelled"]
    value = source[variant]["all"]
    return float(value) if value is not None else 0.0


def summary_row(
    epoch: int, train_stats: dict, results: dict | None, args: argparse.Namespace, summary_scalars: tuple[str, ...]
) -> dict:
    """The reference's summary columns (combined values of the selection variant), the method's own training
    scalars (``MetaArch.summary_scalars``, as ``train_<name>``), then every set and variant.

    Epochs without validation (``results`` None) get empty accuracy cells.
    """
    variant = args.eval_funcs[0]
    results = results or {}
    combined = results["combined"][variant] if "combined" in results else {}
    row = {
        "epoch": epoch,
        "train_loss": train_stats["loss"],
        "eval_all_acc": combined.get("all"),
        "eval_old_acc": combined.get("old"),
        "eval_new_acc": combined.get("new"),
        "lr": train_stats["lr"],
    }
    row.update({f"train_{name}": train_stats[name] for name in summary_scalars if name in train_stats})
    for target, scores in results.get("verification", {}).items():
        row.update({f"{target}_{key}": value for key, value in scores.items() if isinstance(value, float)})
    for set_name, per_variant in results.items():
        if set_name == "verification":
            continue
        for var, entries in per_variant.items():
            for entry, value in entries.items():
                row[f"{set_name}_{var}_{entry}"] = value
    return row


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
