"""The training loop of every method (timm's and the torchvision references' layout: ``train.py`` is a thin command
line over :func:`train`, which tests and wrappers call in-process).

Setup, the method's run (from the registry), optimiser and schedule, resume, then per epoch: schedules and seeds,
``train_one_epoch``, validation, checkpoints and logs. Only ``model.meta_arch.MetaArch`` hooks and ``Method`` entries
are called; nothing here knows a method by name.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from trainer.args import image_size_from_args, log_ignored_flags
from trainer.data import check_same_data, epoch_seed, make_train_loader
from trainer.engine import NonFiniteLossError, train_one_epoch
from trainer.figures import write_run_figures
from trainer.methods import Method, checkpoint_method_name
from trainer.optim import create_optimizer, create_scheduler, resolve_lr
from trainer.precision import enable_cuda_tf32, resolve_precision
from trainer.validation import selection_metric, summary_row, validate
from utils.checkpoint import CheckpointError, CheckpointSaver, capture_rng_state, load_checkpoint, restore_rng_state
from utils.config import save_args_yaml
from utils.distributed import cleanup, get_rank, get_world_size, init_distributed, is_primary
from utils.logging import JsonlWriter, WandbLogger, setup_logging, truncate_jsonl, truncate_summary, update_summary
from utils.plots import plot_training_curves
from utils.run_lock import RunLock

logger = logging.getLogger("train")

CHECKPOINT_VERSION = 1


def check_common_args(args: argparse.Namespace) -> None:
    """Reject shared flag values that cannot work, before anything expensive happens."""
    for target in args.val_targets:
        if not (Path(target).is_dir() or (Path(target).suffix == ".bin" and Path(target).is_file())):
            raise ValueError(f"--val-targets {target}: expected an existing .bin pair set or IJB folder")
    for name in ("epochs", "batch_size", "grad_accum_steps", "val_interval", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.prop_train_labels <= 1.0:
        raise ValueError(f"--prop-train-labels must be in (0, 1], got {args.prop_train_labels}")


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


def _resume(ckpt, args, data_cfg, model, optimizer, scheduler, scaler, sampler, saver) -> int:
    """Restore the ``last.pth.tar``-style checkpoint ``ckpt`` (read from ``--resume``); returns the epoch to start
    from.

    With ``--no-resume-opt`` only the model weights are restored and training starts at epoch 0. The checkpoint's
    data settings must equal the run's (same labelled subset).
    """
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


# Settings a resumed run must share with its checkpoint besides the method's own flags (data paths may move).
RESUME_SETTINGS = ("arch", "patch_size", "input_size", "input_preset", "dataset", "prop_train_labels", "split_seed")


def check_resume_settings(ckpt: dict, args: argparse.Namespace, method: type[Method]) -> None:
    """``--resume`` continues the run its checkpoint belongs to: the architecture, the data settings and every flag of
    the method's own groups must equal the stored ones (paths excepted). Nothing is written before this check.

    Raises:
        CheckpointError: the method or a setting differs (each flag named with both values).
    """
    stored_method = checkpoint_method_name(ckpt)
    if stored_method != args.method:
        raise CheckpointError(f"--resume {args.resume} is a --method {stored_method} run; this run is {args.method}")
    stored = ckpt.get("args") or {}
    probe = argparse.ArgumentParser(add_help=False)
    method.add_args(probe)
    own = {action.dest for action in probe._actions if not action.dest.endswith("_weights")}
    differ = []
    for dest in sorted(set(RESUME_SETTINGS) | own):
        if dest in stored and hasattr(args, dest) and _plain(getattr(args, dest)) != _plain(stored[dest]):
            differ.append(f"--{dest.replace('_', '-')} {_plain(getattr(args, dest))} (the run: {_plain(stored[dest])})")
    if differ:
        raise CheckpointError(
            f"--resume {args.resume} continues a run with other settings: {'; '.join(differ)}; drop or fix these "
            "flags (or start a new run with --initial-checkpoint)"
        )


def _plain(value: object) -> object:
    """Lists and tuples compare equal (YAML and checkpoints store lists)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def train(args: argparse.Namespace, method: type[Method]) -> int:
    """Run training of ``method`` (``trainer.cli.parse_train_args`` gives both); returns the process exit code.

    The run folder is locked (``utils.run_lock``) by the primary rank for the whole run: a second process that
    writes the same ``--experiment`` stops at once with an error naming this one.
    """
    check_common_args(args)
    device = init_distributed(args.device)
    out_dir = _experiment_dir(args)
    with RunLock(out_dir, "run folder") if is_primary() else contextlib.nullcontext():
        return _train(args, method, device, out_dir)


def _train(args: argparse.Namespace, method: type[Method], device: torch.device, out_dir: Path) -> int:
    """:func:`train` once the run folder is locked."""
    _check_fresh_output(args, out_dir)
    resumed = load_checkpoint(args.resume, weights_only=not args.unsafe_load) if args.resume else None
    if resumed is not None:
        check_resume_settings(resumed, args, method)
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
    setup = method.build(args, image_size)
    model_without_ddp = setup.model.to(device)
    loader, loader_generator = make_train_loader(setup.train_set, setup.sampler, args, device)
    sampler, data_cfg = setup.sampler, setup.data_config
    # what this run determined, stored in args.yaml and the checkpoints
    recorded = {**precision.to_dict(), "lr_scaling": method.lr_scaling}
    logger.info("%s (--method %s)", setup.description, args.method)
    if args.grad_checkpointing:
        model_without_ddp.set_grad_checkpointing(True)
    model = model_without_ddp.prepare_for_distributed_training(device, broadcast_buffers=not args.no_ddp_bb)

    # optimiser and schedule
    global_batch = args.batch_size * get_world_size() * args.grad_accum_steps
    lr = resolve_lr(args.lr, args.lr_base, global_batch, args.opt, lr_base_scale=method.lr_scaling)
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
    if resumed is not None:
        start_epoch = _resume(resumed, args, data_cfg, model_without_ddp, optimizer, scheduler, scaler, sampler, saver)
        del resumed  # the run holds its own copies now
        logger.info("resumed from %s at epoch %d", args.resume, start_epoch)
    if is_primary():
        # An epoch whose last.pth.tar was never written is trained again: drop the rows it left.
        truncate_summary(out_dir / "summary.csv", start_epoch)
        truncate_jsonl(out_dir / "log.jsonl", start_epoch)

    # outputs
    wandb_logger = WandbLogger(
        args.log_wandb and is_primary(),
        project=args.wandb_project,
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
                clip_grad=args.clip_grad if args.clip_grad and args.clip_grad > 0 else None,
                log_interval=args.log_interval,
                save_images_dir=out_dir if args.save_images else None,
                progress=not args.no_progress,
                scheduler=scheduler,
            )
        except NonFiniteLossError as err:
            logger.error("%s", err)
            wandb_logger.finish()
            cleanup()
            return 2
        elapsed = time.perf_counter() - start
        views = model_without_ddp.views_per_sample
        train_stats["throughput"] = len(loader) * args.batch_size * get_world_size() * views / max(elapsed, 1e-9)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}

        # validate
        results = None
        if (epoch + 1) % args.val_interval == 0 or epoch + 1 == args.epochs:
            results = validate(model_without_ddp, setup, args, device, precision, epoch, image_size, out_dir)
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
                metric = selection_metric(results, args, epoch) if args.checkpoint_select == "best" else float(epoch)
                state["metric"] = metric
                saver.save_checkpoint(state, epoch, metric)
            row = summary_row(epoch, train_stats, results, args, model_without_ddp.summary_scalars)
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
