#!/usr/bin/env python3
"""FaceGCD training: prefix-tuned ViT with a HyperNetwork prefix generator (docs/method.md, sections 5 to 9).

python train.py --dataset synthfaces_tiny --arch vit_tiny --patch_size 16 --grad-from-block 0 --epochs 2
torchrun --nproc_per_node=2 train.py --dataset youtubefaces_1000 --data-path youtube_faces_1000 ...
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from data_loader import DatasetError
from data_loader.recognition import RECOGNITION_SETS
from trainer.args import (
    ARCHS,
    add_compat_args,
    add_data_args,
    add_model_args,
    add_recognition_args,
    add_runtime_args,
    add_ssl_args,
    image_size_from_args,
    log_ignored_flags,
)
from trainer.data import check_same_data, epoch_seed, make_train_loader
from trainer.engine import NonFiniteLossError, evaluate, evaluate_verification, train_one_epoch
from trainer.figures import write_run_figures
from trainer.methods import MethodSetup, build_method
from trainer.optim import SUPPORTED_SCHEDULERS, create_optimizer, create_scheduler, resolve_lr
from trainer.precision import enable_cuda_tf32, resolve_precision
from utils.checkpoint import CheckpointError, CheckpointSaver, capture_rng_state, load_checkpoint, restore_rng_state
from utils.config import parse_args_with_config, save_args_yaml
from utils.distributed import cleanup, get_rank, get_world_size, init_distributed, is_primary
from utils.logging import JsonlWriter, WandbLogger, setup_logging, truncate_jsonl, truncate_summary, update_summary
from utils.plots import plot_training_curves

logger = logging.getLogger("train")

CHECKPOINT_VERSION = 1


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The full training parser (reused by tests and wrappers)."""
    parser = argparse.ArgumentParser("FaceGCD training", add_help=add_help)
    parser.add_argument("-c", "--config", default="", help="YAML file whose keys set parser defaults")
    add_data_args(parser)
    add_model_args(parser)
    add_recognition_args(parser)
    add_ssl_args(parser)
    add_runtime_args(parser)

    group = parser.add_argument_group("Losses")
    group.add_argument("--temperature", type=float, default=1.0, help="InfoNCE temperature (default: 1.0)")
    group.add_argument(
        "--sup_con_weight",
        "--sup-con-weight",
        dest="sup_con_weight",
        type=float,
        default=0.35,
        help="weight of SupCon; InfoNCE gets 1 - this (default: 0.35)",
    )
    group.add_argument(
        "--contrast_unlabel_only",
        "--contrast-unlabel-only",
        dest="contrast_unlabel_only",
        action="store_true",
        help="InfoNCE over unlabelled samples only",
    )
    group.add_argument(
        "--not-contrastive",
        "--not_contrastive",
        dest="not_contrastive",
        action="store_true",
        help="rejected: the reference's non-contrastive path is broken (docs/decisions.md, part B)",
    )

    group = parser.add_argument_group("Optimiser and schedule")
    group.add_argument("--opt", default="sgd", help="sgd (Nesterov), momentum or adamw (default: sgd)")
    group.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: from --lr-base)")
    group.add_argument(
        "--lr-base",
        "--lr_base",
        dest="lr_base",
        type=float,
        default=0.1,
        help="lr per 256 images of global batch (default: 0.1)",
    )
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    group.add_argument(
        "--weight-decay",
        "--weight_decay",
        dest="weight_decay",
        type=float,
        default=2e-5,
        help="weight decay on >= 2-D parameters (default: 2e-5)",
    )
    group.add_argument("--epochs", type=int, default=100, help="training epochs (default: 100)")
    group.add_argument(
        "--warmup-epochs",
        "--warmup_epochs",
        dest="warmup_epochs",
        type=int,
        default=5,
        help="linear warm-up epochs (default: 5)",
    )
    group.add_argument(
        "--warmup-lr",
        "--warmup_lr",
        dest="warmup_lr",
        type=float,
        default=1e-5,
        help="warm-up start lr (default: 1e-5)",
    )
    group.add_argument("--min-lr", "--min_lr", dest="min_lr", type=float, default=0.0, help="cosine floor (default: 0)")
    group.add_argument(
        "--sched",
        default="cosine",
        choices=SUPPORTED_SCHEDULERS,
        help="lr schedule after the warm-up: cosine to --min-lr, or step (x --decay-rate at each of "
        "--decay-milestones) (default: cosine)",
    )
    group.add_argument(
        "--decay-milestones",
        type=int,
        nargs="+",
        default=[],
        help="--sched step: epochs at which the lr is multiplied by --decay-rate (GB-CosFace: 5 10 15 20 of 24)",
    )
    group.add_argument(
        "--decay-rate", type=float, default=0.1, help="--sched step: lr factor at each milestone (default: 0.1)"
    )
    group.add_argument(
        "--grad-accum-steps",
        "--grad_accum_steps",
        dest="grad_accum_steps",
        type=int,
        default=1,
        help="micro-batches per optimiser step; when the steps per epoch are not a multiple of it, the epoch's last, "
        "shorter group still steps, on the mean gradient of the micro-batches it holds (default: 1)",
    )
    group.add_argument(
        "--clip-grad",
        "--clip_grad",
        dest="clip_grad",
        type=float,
        default=None,
        help="max gradient norm (default: no clipping)",
    )
    group.add_argument(
        "--sampler",
        choices=("distributed", "reference"),
        default="distributed",
        help="one global epoch over all ranks, or the reference's full epoch per rank",
    )

    group = parser.add_argument_group("Validation and checkpoints")
    group.add_argument(
        "-val-interval",
        "--val-interval",
        "--val_interval",
        dest="val_interval",
        type=int,
        default=10,
        help="validate when (epoch + 1) %% this == 0, and after the last epoch (default: 10)",
    )
    group.add_argument(
        "--eval_funcs",
        "--eval-funcs",
        dest="eval_funcs",
        nargs="+",
        default=["v2", "v1"],
        choices=("v1", "v2"),
        help="metric variants; the first selects model_best (default: v2 v1)",
    )
    group.add_argument(
        "--checkpoint-select",
        choices=("best", "last"),
        default="best",
        help="model_best.pth.tar = the last validated epoch (last; the recipes' choice), or the best validation "
        "accuracy (best, reproduces the reference: it reads the ground truth of the unlabelled images and of the test "
        "split, which GCD assumes unknown, so its numbers are optimistic) (default: best)",
    )
    group.add_argument(
        "--select-on",
        choices=("combined", "unlabelled"),
        default="combined",
        help="with --checkpoint-select best: select on the mean of D_U and test, or on D_U only; both read "
        "unlabelled ground truth (default: combined)",
    )
    group.add_argument("--val-kmeans-init", type=int, default=10, help="validation k-means restarts (default: 10)")
    group.add_argument("--val-kmeans-iter", type=int, default=300, help="validation k-means iterations (default: 300)")
    group.add_argument("--checkpoint-hist", type=int, default=10, help="checkpoint-N files kept (default: 10)")
    group.add_argument("--output", default="./output/train", help="output root (default: ./output/train)")
    group.add_argument("--resume", default="", help="checkpoint to resume from (model, optimiser, schedule, RNG)")
    group.add_argument("--no-resume-opt", action="store_true", help="with --resume, restore the model only")
    group.add_argument("--initial-checkpoint", default="", help="load model weights only from this checkpoint")
    group.add_argument(
        "--unsafe-load", action="store_true", help="load checkpoints with weights_only=False (only for files you trust)"
    )

    group = parser.add_argument_group("Logging")
    group.add_argument("--log-interval", type=int, default=50, help="steps between log lines (default: 50)")
    group.add_argument("--log-wandb", action="store_true", help="log to wandb (offline without an API key)")
    group.add_argument("--save-images", action="store_true", help="save input grids at log steps")
    group.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    group.add_argument("--no-ddp-bb", action="store_true", help="DDP broadcast_buffers=False")
    add_compat_args(parser)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, before anything expensive happens."""
    if args.not_contrastive:
        raise ValueError("--not-contrastive is not supported: the reference's non-contrastive trainer is broken")
    if args.method in ("facegcd", "dino", "lafs") and args.arch not in ARCHS:
        raise ValueError(
            f"--arch {args.arch} is a recognition backbone; --method {args.method} needs one of {', '.join(ARCHS)}"
        )
    for target in args.val_targets:
        if not (Path(target).is_dir() or (Path(target).suffix == ".bin" and Path(target).is_file())):
            raise ValueError(f"--val-targets {target}: expected an existing .bin pair set or IJB folder")
    if args.method == "facegcd" and args.dataset in RECOGNITION_SETS:
        raise ValueError(f"--dataset {args.dataset} has no GCD split; it trains with --method recognition")
    for name in ("epochs", "batch_size", "grad_accum_steps", "val_interval", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.prop_train_labels <= 1.0:
        raise ValueError(f"--prop-train-labels must be in (0, 1], got {args.prop_train_labels}")
    if (
        args.method == "facegcd"
        and args.grad_from_block > 0
        and not (args.pretrained_weights or args.resume or args.initial_checkpoint)
    ):
        raise ValueError(
            f"--grad-from-block {args.grad_from_block} without --pretrained_weights would train the prefixes over a "
            "frozen random ViT (blocks 0..{} stay at their random initialisation); pass --pretrained_weights with DINO "
            "weights, or --grad-from-block 0 to train every block from scratch".format(args.grad_from_block - 1)
        )


def _experiment_dir(args: argparse.Namespace) -> Path:
    if not args.experiment:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.experiment = f"{stamp}-{args.arch}-patch{args.patch_size}-{image_size_from_args(args)}"
    return Path(args.output) / args.experiment


def _check_fresh_output(args: argparse.Namespace, out_dir: Path) -> None:
    """A run folder holding a run (``last.pth.tar``) is only continued, from that file; nothing else writes there.

    Raises:
        ValueError: a fresh run, a ``--resume`` from another file, or ``--no-resume-opt`` (which restarts at epoch 0
            and would drop the logged epochs) into a folder that already holds a run.
    """
    last = out_dir / "last.pth.tar"
    if not last.exists():
        return
    continues_it = bool(args.resume) and Path(args.resume).resolve() == last.resolve() and not args.no_resume_opt
    if not continues_it:
        raise ValueError(
            f"{out_dir} already holds a run (last.pth.tar, interrupted or finished): continue it with --resume {last}, "
            "or pick another --experiment"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _selection_metric(results: dict, args: argparse.Namespace, epoch: int) -> float:
    """First verification target's accuracy when there are targets, else the clustering selection accuracy, else
    the epoch (nothing validated: the latest wins)."""
    if results.get("verification"):
        return float(next(iter(results["verification"].values()))["accuracy"])
    if "combined" not in results:
        return float(epoch)
    variant = args.eval_funcs[0]
    source = results["combined"] if args.select_on == "combined" else results["unlabelled"]
    value = source[variant]["all"]
    return float(value) if value is not None else 0.0


def _validate(
    model: torch.nn.Module, setup: MethodSetup, args: argparse.Namespace, device, precision, epoch: int, out_dir: Path
) -> dict:
    """Clustering validation on the method's GCD sets (when it has them) and verification on ``--val-targets``
    (primary rank; IJB tables and ROC curves in ``<run>/verification/``), logged per set."""
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
            n_init=args.val_kmeans_init,
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
    if args.val_targets and is_primary():
        results["verification"] = evaluate_verification(
            model,
            args.val_targets,
            image_size=image_size_from_args(args),
            device=device,
            precision=precision,
            batch_size=args.batch_size,
            output_dir=out_dir / "verification",
            progress=not args.no_progress,
        )
        for target, scores in results["verification"].items():
            logger.info("epoch %d %s: %s", epoch, target, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return results


def _summary_row(epoch: int, train_stats: dict, results: dict | None, args: argparse.Namespace) -> dict:
    """The reference's summary columns (combined values of the selection variant), then every set and variant.

    Epochs without validation (`results` None) get empty accuracy cells.
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
    if "teacher_entropy" in train_stats:  # DINO / LAFS
        row["train_teacher_entropy"] = train_stats["teacher_entropy"]
    for target, scores in results.get("verification", {}).items():
        row.update({f"{target}_{key}": value for key, value in scores.items() if isinstance(value, float)})
    for set_name, per_variant in results.items():
        if set_name == "verification":
            continue
        for var, entries in per_variant.items():
            for entry, value in entries.items():
                row[f"{set_name}_{var}_{entry}"] = value
    return row


def _checkpoint_state(
    epoch, args, model_config, data_cfg, recorded, model, optimizer, scheduler, scaler, sampler
) -> dict:
    """Everything ``--resume`` needs, as tensors and plain types (loads with ``weights_only=True``).

    A collective for model-parallel methods (their weights and optimiser state are gathered): call on every rank.
    """
    return {
        "epoch": epoch,
        "arch": args.arch,
        "method": args.method,
        "state_dict": model.checkpoint_state_dict(),
        "optimizer": model.optimizer_state_dict(optimizer),
        "scheduler": scheduler.state_dict(),
        "amp_scaler": scaler.state_dict(),
        "args": vars(args),
        "model_config": model_config,
        "data_config": data_cfg,
        "recorded": recorded,
        "metric": None,
        "rng": capture_rng_state(),
        "sampler": sampler.state_dict(),
        "version": CHECKPOINT_VERSION,
    }


def _resume(args, data_cfg, model, optimizer, scheduler, scaler, sampler, saver) -> int:
    """Restore a ``last.pth.tar``-style checkpoint; returns the epoch to start from.

    With ``--no-resume-opt`` only the model weights are restored and training starts at epoch 0. The checkpoint's
    data settings must equal the run's (same labelled subset).
    """
    ckpt = load_checkpoint(args.resume, weights_only=not args.unsafe_load)
    stored_method = ckpt.get("method", "facegcd")
    if stored_method != args.method:
        raise CheckpointError(f"--resume {args.resume} is a --method {stored_method} run; this run is {args.method}")
    check_same_data(ckpt.get("data_config"), data_cfg, f"--resume {args.resume}")
    model.load_checkpoint_state_dict(ckpt["state_dict"])
    start_epoch = 0
    if not args.no_resume_opt:
        model.load_optimizer_state_dict(optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["amp_scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        restore_rng_state(ckpt["rng"])
        if saver is not None and ckpt.get("saver"):
            saver.load_state_dict(ckpt["saver"])
        start_epoch = int(ckpt["epoch"]) + 1
    return start_epoch


def main(args: argparse.Namespace) -> int:
    """Run training; returns the process exit code."""
    _check_args(args)
    device = init_distributed(args.device)
    out_dir = _experiment_dir(args)
    _check_fresh_output(args, out_dir)
    setup_logging(out_dir if is_primary() else None, rank=get_rank())
    log_ignored_flags(args)
    precision = resolve_precision(args.amp, args.amp_impl, args.amp_dtype, device)
    if device.type == "cuda":
        enable_cuda_tf32()
        torch.backends.cudnn.benchmark = True
    _seed_everything(args.seed)
    logger.info(
        "device %s, world size %d, precision %s, output %s", device, get_world_size(), precision.describe(), out_dir
    )

    # method: model, data, sampler
    image_size = image_size_from_args(args)
    setup = build_method(args, image_size)
    model_without_ddp = setup.model.to(device)
    loader, loader_generator = make_train_loader(setup.train_set, setup.sampler, args, device)
    sampler, data_cfg = setup.sampler, setup.data_config
    recorded = precision.to_dict()  # what this run determined, stored in args.yaml and the checkpoints
    logger.info("%s (--method %s)", setup.description, args.method)
    if args.grad_checkpointing:
        model_without_ddp.set_grad_checkpointing(True)
    model = model_without_ddp.prepare_for_distributed_training(device, broadcast_buffers=not args.no_ddp_bb)

    # optimiser and schedule
    global_batch = args.batch_size * get_world_size() * args.grad_accum_steps
    lr = resolve_lr(args.lr, args.lr_base, global_batch, args.opt)
    optimizer = create_optimizer(
        model_without_ddp.get_params_groups(args.weight_decay),
        opt=args.opt,
        lr=lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    if setup.prepare_schedules is not None:
        setup.prepare_schedules(len(loader), lr)
    scheduler = create_scheduler(
        args.sched,
        optimizer,
        base_lr=lr,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        milestones=args.decay_milestones,
        decay_rate=args.decay_rate,
    )
    scaler = precision.grad_scaler()
    saver = CheckpointSaver(out_dir, max_history=args.checkpoint_hist) if is_primary() else None
    logger.info(
        "global batch %d, lr %.6g, %d trainable parameters",
        global_batch,
        lr,
        sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad),
    )

    # resume
    start_epoch = 0
    if args.resume:
        start_epoch = _resume(args, data_cfg, model_without_ddp, optimizer, scheduler, scaler, sampler, saver)
        logger.info("resumed from %s at epoch %d", args.resume, start_epoch)
    if is_primary():
        # An epoch whose last.pth.tar was never written is trained again: drop the rows it left.
        truncate_summary(out_dir / "summary.csv", start_epoch)
        truncate_jsonl(out_dir / "log.jsonl", start_epoch)

    # outputs
    wandb_logger = WandbLogger(
        args.log_wandb and is_primary(),
        project="GCD_base_prefix_gen",
        name=args.experiment,
        config=vars(args),
        output_dir=out_dir,
    )
    jsonl = JsonlWriter(out_dir / "log.jsonl") if is_primary() else None
    if is_primary():
        save_args_yaml(args, out_dir / "args.yaml", recorded=recorded)

    for epoch in range(start_epoch, args.epochs):
        # apply schedules and seeds
        scheduler.step(epoch)
        sampler.set_epoch(epoch)
        seed = epoch_seed(args.seed, get_rank(), epoch)
        _seed_everything(seed)
        loader_generator.manual_seed(seed)

        # train
        start = time.perf_counter()
        try:
            train_stats = train_one_epoch(
                model,
                loader,
                optimizer,
                scaler,
                precision,
                epoch=epoch,
                device=device,
                grad_accum_steps=args.grad_accum_steps,
                clip_grad=args.clip_grad,
                log_interval=args.log_interval,
                save_images_dir=out_dir if args.save_images else None,
                progress=not args.no_progress,
            )
        except NonFiniteLossError as err:
            logger.error("%s", err)
            wandb_logger.finish()
            cleanup()
            return 2
        elapsed = time.perf_counter() - start
        views = {"facegcd": 2, "recognition": 1}.get(args.method, 2 + args.local_crops_number)
        train_stats["throughput"] = len(loader) * args.batch_size * get_world_size() * views / max(elapsed, 1e-9)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}

        # validate
        results = None
        if (epoch + 1) % args.val_interval == 0 or epoch + 1 == args.epochs:
            results = _validate(model_without_ddp, setup, args, device, precision, epoch, out_dir)
            record["eval"] = results

        # checkpointing and logging
        state = _checkpoint_state(
            epoch,
            args,
            setup.model_config,
            data_cfg,
            recorded,
            model_without_ddp,
            optimizer,
            scheduler,
            scaler,
            sampler,
        )
        if is_primary():
            if results is not None:
                metric = _selection_metric(results, args, epoch) if args.checkpoint_select == "best" else float(epoch)
                state["metric"] = metric
                saver.save_checkpoint(state, epoch, metric)
            row = _summary_row(epoch, train_stats, results, args)
            # the epoch's rows go in before last.pth.tar, the resume point: --resume drops rows of unfinished epochs
            update_summary(epoch, row, out_dir / "summary.csv", write_header=not (out_dir / "summary.csv").exists())
            jsonl.write(record)
            plot_training_curves(out_dir / "summary.csv", out_dir / "training_curves.png")
            if results is not None:
                wandb_logger.log(row, step=epoch)
            state["saver"] = saver.state_dict()
            saver.save_last(state)
            model_without_ddp.export(out_dir, epoch, vars(args))
            wandb_logger.log(
                {
                    "epoch": epoch,
                    "train_loss": train_stats["loss"],
                    "lr": train_stats["lr"],
                    "throughput": train_stats["throughput"],
                },
                step=epoch,
            )
    wandb_logger.finish()
    if is_primary():
        write_run_figures(model_without_ddp, setup, out_dir, device)
        logger.info("done: outputs in %s", out_dir)
    cleanup()
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _cli() -> int:
    """``main`` for the command line: bad input (flags, files, data) ends with one error message and exit code 2."""
    try:
        return main(parse_args_with_config(get_args_parser()))
    except (ValueError, FileNotFoundError, CheckpointError, DatasetError) as err:
        logging.getLogger("train").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
