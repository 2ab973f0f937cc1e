"""One training epoch and one validation pass (docs/method.md, sections 6 and 8)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from trainer.features import embed_dataset
from trainer.precision import Precision
from utils.distributed import all_gather_variable, is_primary
from utils.kmeans import kmeans
from utils.logging import MetricLogger, SmoothedValue
from utils.evaluation.clustering import evaluate_clustering

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; the last good checkpoint is left untouched."""


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    *,
    epoch: int,
    device: torch.device,
    grad_accum_steps: int = 1,
    clip_grad: float | None = None,
    log_interval: int = 50,
    save_images_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` (a ``FaceGCD``, possibly DDP-wrapped) for one pass over ``loader``.

    Args:
        model: module whose forward returns the loss dict of ``FaceGCD.forward``.
        loader: yields ``(views, label, uq_idx, is_labelled)`` with ``views`` a list of two (B, 3, S, S) batches.
        optimizer: optimiser over the trainable parameters.
        scaler: GradScaler (disabled unless float16 on CUDA).
        precision: autocast settings.
        epoch: 0-based epoch, for messages.
        device: compute device.
        grad_accum_steps: micro-batches per optimiser step (DDP ``no_sync`` on all but the last of each group).
            When ``len(loader)`` is not a multiple of it, the epoch's last, shorter group still takes its optimiser
            step, with each loss divided by that group's size, so every step uses the mean gradient over the
            micro-batches it holds and DDP synchronises on the epoch's last micro-batch.
        clip_grad: max gradient norm, or None.
        log_interval: steps between log lines (and saved input grids).
        save_images_dir: folder for ``train-batch-<step>.jpg`` grids, or None.
        progress: show a progress bar on the primary rank.

    Returns:
        Epoch averages (``loss``, ``loss_unsup``, ``loss_sup``, ``labelled_fraction``, ``no_labelled_batches``).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps (--grad-accum-steps) must be >= 1, got {grad_accum_steps}")
    num_steps = len(loader)  # the epoch's last accumulation group may be shorter; it still steps
    model.train()
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    optimizer.zero_grad(set_to_none=True)
    batches = no_labelled_batches = 0
    for step, (views, labels, _, is_labelled) in enumerate(
        metric_logger.log_every(loader, log_interval, header, progress=progress)
    ):
        if step >= num_steps:
            raise RuntimeError(f"the training loader yielded more batches than its len() of {num_steps}")
        images = torch.cat(views, dim=0).to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        is_labelled = is_labelled.to(device, non_blocking=True).bool()
        if save_images_dir is not None and step % log_interval == 0 and is_primary():
            _save_input_grid(images, save_images_dir / f"train-batch-{step}.jpg")

        group_start = step - step % grad_accum_steps
        group_size = min(grad_accum_steps, num_steps - group_start)
        final_micro_step = step + 1 == group_start + group_size
        sync_ctx = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel) and not final_micro_step
            else contextlib.nullcontext()
        )
        with sync_ctx:
            with precision.autocast():
                losses = model(images, labels, is_labelled)
            loss = losses["loss"]
            loss_value = loss.item()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss_value}) at epoch {epoch}, step {step}; the run stops here and "
                    "the last good checkpoint (last.pth.tar of the previous epoch) is kept"
                )
            scaler.scale(loss / group_size).backward()
        if final_micro_step:
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for group in optimizer.param_groups for p in group["params"]], clip_grad
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        batches += 1
        has_labelled = bool(losses["has_labelled"])
        no_labelled_batches += int(not has_labelled)
        metric_logger.update(
            loss=loss_value,
            loss_unsup=float(losses["loss_unsup"]),
            loss_sup=float(losses["loss_sup"]),
            labelled_fraction=float(is_labelled.float().mean()),
            lr=optimizer.param_groups[0]["lr"],
        )
    if batches != num_steps:
        raise RuntimeError(
            f"the training loader yielded {batches} batches but its len() is {num_steps}; the last gradient "
            "accumulation group would be lost"
        )
    metric_logger.synchronize_between_processes()
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    stats["no_labelled_batches"] = float(no_labelled_batches)
    if no_labelled_batches:
        logger.info("epoch %d: %d batches had no labelled sample (SupCon term skipped)", epoch, no_labelled_batches)
    return stats


def _save_input_grid(images: torch.Tensor, path: Path) -> None:
    """Write a de-normalised grid of the (2B, 3, S, S) input batch."""
    from torchvision.utils import save_image

    mean = torch.tensor([0.485, 0.456, 0.406], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=images.device).view(1, 3, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images[:64].float() * std + mean).clamp(0, 1), path, nrow=8)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_sets: dict[str, torch.utils.data.Dataset],
    *,
    num_classes: int,
    num_known: int,
    device: torch.device,
    precision: Precision,
    batch_size: int = 256,
    num_workers: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    eval_funcs: tuple[str, ...] = ("v2", "v1"),
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Validation as in docs/method.md (section 8): plain k-means with K = N on each set, separately.

    Features are computed on rank-local strided shards and clustered in place (the k-means all-reduces its
    statistics), so no rank holds the whole set; only labels and predictions are gathered for the metrics.

    Args:
        model: the unwrapped ``FaceGCD``.
        eval_sets: name -> dataset with items ``(image, label, uq_idx)`` (e.g. ``unlabelled`` and ``test``).
        num_classes: K for k-means.
        num_known: labels below this are old.
        device: compute device.
        precision: autocast settings for the forward passes.
        batch_size: images per forward.
        num_workers: DataLoader workers.
        n_init: k-means restarts.
        max_iter: Lloyd iterations per restart.
        tol: convergence tolerance.
        seed: k-means seed.
        eval_funcs: metric variants to compute.

    Returns:
        ``{set_name: {variant: {"all", "old", "new"}}}`` plus ``combined`` (mean over the sets).
    """
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, dataset in eval_sets.items():
        shard = embed_dataset(
            model.extract_features,
            dataset,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            autocast=precision.autocast(),
            gather=False,
            desc=f"features {name}",
        )
        fit = kmeans(shard.features, num_classes, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
        predictions = torch.cat(all_gather_variable(fit.labels.to(device))).cpu()
        labels = torch.cat(all_gather_variable(shard.labels.to(device))).cpu()
        results[name] = evaluate_clustering(labels, predictions, labels < num_known, eval_funcs=eval_funcs)
    results["combined"] = _mean_over_sets(results, eval_funcs)
    model.train(was_training)
    return results


def _mean_over_sets(
    results: dict[str, dict[str, dict[str, float | None]]], eval_funcs: tuple[str, ...]
) -> dict[str, dict[str, float | None]]:
    """Mean of each (variant, entry) over the evaluated sets, ignoring None entries."""
    combined: dict[str, dict[str, float | None]] = {}
    for variant in eval_funcs:
        combined[variant] = {}
        for entry in ("all", "old", "new"):
            values = [r[variant][entry] for r in results.values() if r[variant][entry] is not None]
            combined[variant][entry] = sum(values) / len(values) if values else None
    return combined
