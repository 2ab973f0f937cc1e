"""One training epoch and one validation pass (docs/method.md, sections 6 and 8)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data_loader.transforms import resize_size
from trainer.features import embed_dataset
from trainer.optim import WarmupScheduler
from trainer.precision import Precision
from utils.distributed import all_gather_variable, get_world_size, is_primary
from utils.evaluation.clustering import evaluate_clustering
from utils.evaluation.ijb import AGGREGATOR_POOLING, DEFAULT_MODE, AggregateFn, evaluate_ijb, ijb_name
from utils.evaluation.pair_sets import evaluate_pair_set
from utils.kmeans import kmeans
from utils.logging import MetricLogger, SmoothedValue
from utils.presets import GCD_PRESET, preset_normalisation

logger = logging.getLogger(__name__)


IJB_HEADLINE = "tar@1e-4"  # the IJB figure (TAR at FAR 1e-4, N1D1F1) verification selects checkpoints on
# The IJB modes scored for a model with a template aggregator, beside its ``mean`` and ``aggregator`` pooling:
# insightface's default, and its pooling of the aggregator's own image features (no flip, no detector score).
AGGREGATOR_IJB_MODES = (DEFAULT_MODE, "N1D0F0", "N0D0F0")


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss was NaN or infinite; the epoch's checkpoint is not written."""


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
    scheduler: WarmupScheduler | None = None,
) -> dict[str, float]:
    """Train one pass over ``loader`` for any method (``model.meta_arch.MetaArch``).

    The step does not wait for the device: the logged scalars stay on it until a log line (every ``log_interval``
    steps and the last step) or the epoch's statistics read them. The NaN guard records on the device the first step
    whose loss is NaN or infinite and is read at the same steps, right after their forward pass, all ranks agreeing
    (docs/method.md, section 6): the run stops there with :class:`NonFiniteLossError`, before the epoch's
    checkpoint, having taken at most ``log_interval - 1`` optimiser steps past the bad loss (``log_interval=1``
    stops before the bad step's update).

    Args:
        model: the module ``prepare_for_distributed_training`` returned (the method, or DDP around it); its forward
            takes the method's ``batch_inputs`` and returns a dict of scalars with ``loss``.
        loader: the method's training loader.
        optimizer: optimiser over the trainable parameters.
        scaler: GradScaler (disabled unless float16 on CUDA).
        precision: autocast settings.
        epoch: 0-based epoch, for messages.
        device: compute device.
        grad_accum_steps: micro-batches per optimiser step (``no_sync`` on all but the last of each group).
            When ``len(loader)`` is not a multiple of it, the epoch's last, shorter group still takes its optimiser
            step, with each loss divided by that group's size, so every step uses the mean gradient over the
            micro-batches it holds and DDP synchronises on the epoch's last micro-batch.
        clip_grad: max gradient norm, or None.
        log_interval: steps between log lines, NaN checks and saved input grids.
        save_images_dir: folder for ``train-batch-<step>.jpg`` grids, or None.
        progress: show a progress bar on the primary rank.
        scheduler: the learning-rate schedule; one with ``per_iteration`` set is evaluated before every optimiser
            step at ``epoch + step / len(loader)`` (the loop sets the whole epochs of every schedule).

    Returns:
        Epoch averages of ``loss``, ``lr`` and the method's other scalars, except its ``counted_scalars``, which are
        epoch sums (over all ranks).

    Raises:
        NonFiniteLossError: a loss of this epoch was NaN or infinite on some rank (the message names the first
            such step).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps (--grad-accum-steps) must be >= 1, got {grad_accum_steps}")
    if log_interval < 1:
        raise ValueError(f"log_interval (--log-interval) must be >= 1, got {log_interval}")
    method = model.module if isinstance(model, DistributedDataParallel) else model
    num_steps = len(loader)  # the epoch's last accumulation group may be shorter; it still steps
    model.train()
    method.begin_epoch(epoch)
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    optimizer.zero_grad(set_to_none=True)
    first_non_finite = torch.full((), num_steps, dtype=torch.int64, device=device)  # num_steps: none so far
    batches = 0
    for step, batch in enumerate(metric_logger.log_every(loader, log_interval, header, progress=progress)):
        if step >= num_steps:
            raise RuntimeError(f"the training loader yielded more batches than its len() of {num_steps}")
        inputs = method.batch_inputs(batch, device)
        images = _first_images(inputs[0]) if save_images_dir is not None else None
        if images is not None and step % log_interval == 0 and is_primary():
            _save_input_grid(images, save_images_dir / f"train-batch-{step}.jpg")

        group_start = step - step % grad_accum_steps
        group_size = min(grad_accum_steps, num_steps - group_start)
        final_micro_step = step + 1 == group_start + group_size
        sync_ctx = contextlib.nullcontext() if final_micro_step else model.no_sync()
        with sync_ctx:
            with precision.autocast():
                losses = model(*inputs)
            loss = losses["loss"]
            first_non_finite = torch.where(
                torch.isfinite(loss.detach()), first_non_finite, first_non_finite.clamp(max=step)
            )
            if step % log_interval == 0 or step + 1 == num_steps:
                _stop_on_non_finite_loss(first_non_finite, num_steps, epoch)
            scaler.scale(loss / group_size).backward()
        if final_micro_step:
            progress_epochs = epoch + step / num_steps
            if scheduler is not None and scheduler.per_iteration:
                scheduler.step_at(progress_epochs)
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                method.clip_gradients(clip_grad)
            method.before_optimizer_step(optimizer, progress_epochs)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(progress_epochs)

        batches += 1
        scalars = {k: v for k, v in losses.items() if k != "loss"}
        metric_logger.update(loss=loss, lr=optimizer.param_groups[0]["lr"], **scalars)
    if batches != num_steps:
        raise RuntimeError(
            f"the training loader yielded {batches} batches but its len() is {num_steps}; the last gradient "
            "accumulation group would be lost"
        )
    metric_logger.synchronize_between_processes()
    stats = {
        name: float(meter.total) if name in method.counted_scalars else meter.global_avg
        for name, meter in metric_logger.meters.items()
    }
    method.end_epoch(epoch, stats)
    return stats


def _stop_on_non_finite_loss(first_non_finite: torch.Tensor, num_steps: int, epoch: int) -> None:
    """Raise :class:`NonFiniteLossError` when any rank recorded a non-finite loss (one host synchronisation).

    Args:
        first_non_finite: this rank's first step with a NaN or infinite loss, ``num_steps`` when none.
        num_steps: steps in the epoch.
        epoch: 0-based epoch, for the message.
    """
    if get_world_size() > 1:  # every rank checks at the same steps, so every rank stops together
        first_non_finite = first_non_finite.clone()
        dist.all_reduce(first_non_finite, op=dist.ReduceOp.MIN)
    step = int(first_non_finite.item())
    if step < num_steps:
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, step {step}; the run stops here and the last good "
            "checkpoint (last.pth.tar of the previous epoch) is kept"
        )


def _first_images(inputs: torch.Tensor | list | tuple) -> torch.Tensor | None:
    """The image batch of a method's first input: itself, or the first view of a list of (pairs of) views; batches of
    image sets (B, N, 3, S, S) are flattened to their images; None when the input holds no images (cached
    embeddings)."""
    while not isinstance(inputs, torch.Tensor):
        inputs = inputs[0]
    if inputs.ndim > 4:
        inputs = inputs.flatten(0, -4)
    return inputs if inputs.ndim == 4 else None


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


def uint8_embedder(
    model: nn.Module, image_size: int, device: torch.device, precision: Precision, preset: str = GCD_PRESET
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The verification protocols' ``embed``: (B, 3, H, W) uint8 RGB -> the model's unnormalised features.

    Images pass the evaluation transform of the run's input preset (``data_loader.transforms``), as tensors, so a
    model sees aligned faces as it saw its validation images: ``gcd`` resizes to int(S / 0.875) (bicubic), crops the
    centre S x S and normalises with ImageNet's mean and std; ``face`` takes the whole crop (resized to S x S only
    when it has another size) as ``(x / 255 - 0.5) / 0.5``, insightface's input.
    """
    mean, std = preset_normalisation(preset)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, non_blocking=True).float().div_(255.0)
        if preset == GCD_PRESET:
            resize, top = resize_size(image_size), (resize_size(image_size) - image_size) // 2
            x = F.interpolate(x, size=(resize, resize), mode="bicubic", align_corners=False, antialias=True)
            x = x[..., top : top + image_size, top : top + image_size].clamp_(0.0, 1.0)
        elif x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        x = (x - mean_t) / std_t
        with torch.no_grad(), precision.autocast():
            return model.forward_features(x).float()

    return embed


def template_aggregator(model: nn.Module, device: torch.device) -> AggregateFn | None:
    """The model's learned template pooling as IJB scoring calls it (its ``aggregate_templates`` method, run on
    ``device``), or None for models without one."""
    pool = getattr(model, "aggregate_templates", None)
    if pool is None:
        return None

    def aggregate(units: torch.Tensor, norms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(units.to(device), norms.to(device), mask.to(device)).float().to(units.device)

    return aggregate


def evaluate_verification(
    model: nn.Module,
    targets: list[str],
    *,
    image_size: int,
    device: torch.device,
    precision: Precision,
    batch_size: int = 64,
    num_workers: int = 0,
    exact_roc: bool = False,
    input_preset: str = GCD_PRESET,
    output_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Face verification on each target: ``.bin`` pair sets (10-fold accuracy) and IJB folders (TAR@FAR).

    With a process group every rank must call it: IJB faces are embedded sharded over the ranks (``evaluate_ijb``),
    pair sets are scored on every rank alike, so every rank returns the same results; the primary rank writes the
    IJB files and shows the bars.

    Args:
        model: the model (its ``forward_features``); put in eval mode for the call.
        targets: ``.bin`` pair sets and IJB folders.
        image_size: the model's input side.
        device: where the model runs.
        precision: autocast settings.
        batch_size: images per forward.
        num_workers: DataLoader processes per rank reading and aligning IJB crops.
        exact_roc: IJB TAR@FAR on the exact ROC instead of insightface's (sklearn's ``drop_intermediate=True``).
        input_preset: the model's input preset (``data_loader.transforms``), from its checkpoint.
        output_dir: folder of the IJB tables, JSON and ROC curves (None: none written).
        progress: show tqdm bars.

    Returns:
        ``{target name: scores}``: pair sets ``accuracy`` (mean 10-fold), its std, the threshold, VAL and FAR; IJB
        the ``auc`` and the TAR at every reported FAR (``tar@1e-4`` ...) of the default N1D1F1 mode, or for a model
        with a template aggregator (:func:`template_aggregator`) of its ``aggregator`` pooling (N1D1F1, N1D0F0,
        N0D0F0 and ``mean`` pooling are in the IJB table beside it).
        :func:`headline_score` picks the leading figure of either (IJB: TAR at FAR 1e-4, the one IJB papers lead
        with).
    """
    was_training = model.training
    model.eval()
    embed = uint8_embedder(model, image_size, device, precision, input_preset)
    aggregate = template_aggregator(model, device)
    headline_mode = DEFAULT_MODE if aggregate is None else AGGREGATOR_POOLING
    results: dict[str, dict[str, float]] = {}
    for target in targets:
        path = Path(target)
        if path.suffix == ".bin":
            pair_set = evaluate_pair_set(path, embed, batch_size=batch_size, progress=progress and is_primary())
            scores = pair_set.to_dict()
            results[path.stem] = {k: scores[k] for k in ("accuracy", "accuracy_std", "threshold", "val", "far")}
        else:
            name = ijb_name(path)
            ijb = evaluate_ijb(
                path,
                name,
                embed,
                output_dir=output_dir,
                batch_size=batch_size,
                workers=num_workers,
                exact_roc=exact_roc,
                progress=progress,
                modes=(DEFAULT_MODE,) if aggregate is None else AGGREGATOR_IJB_MODES,
                aggregate=aggregate,
            )
            tars = ijb.to_dict()["tar_at_far"][headline_mode]
            results[name] = {"auc": float(ijb.auc[headline_mode])}
            results[name].update({f"tar@{far}": float(tar) for far, tar in tars.items()})
    model.train(was_training)
    return results


def headline_score(scores: dict[str, float]) -> float:
    """The leading figure of one target's scores: a pair set's 10-fold accuracy, an IJB set's TAR at FAR 1e-4."""
    return float(scores["accuracy"] if "accuracy" in scores else scores[IJB_HEADLINE])
