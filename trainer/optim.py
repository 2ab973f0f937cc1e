"""Optimiser, learning-rate scaling rule and the per-epoch schedules (cosine or step) with linear warm-up.

Described in docs/method.md, section 7. The schedule formulas are ``utils/schedules.py``'s, shared with DINO.

References: timm ``timm/optim/_optim_factory.py`` (``sgd`` = Nesterov SGD), timm ``train.py`` (``--lr-base``
scaling), timm ``timm/scheduler/cosine_lr.py`` (cosine with warm-up, ``warmup_prefix=False``), PyTorch
``torch.optim.lr_scheduler.MultiStepLR`` (milestone semantics of the step schedule).
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch

from utils.schedules import cosine_decay, linear_warmup, poly_decay, set_lr, step_decay

logger = logging.getLogger(__name__)

SUPPORTED_OPTIMIZERS = ("sgd", "nesterov", "momentum", "adamw")


def create_optimizer(
    param_groups: Iterable[dict] | Iterable[torch.nn.Parameter],
    *,
    opt: str = "sgd",
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 2e-5,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """Build the optimiser over the model's parameter groups.

    ``sgd`` and ``nesterov`` are Nesterov SGD (timm's ``sgd``; ``nesterov=False`` turns it into plain momentum),
    ``momentum`` is SGD with classic momentum, ``adamw`` is AdamW. A group's own ``weight_decay`` (e.g. 0.0 for 1-D
    parameters) overrides ``weight_decay``. AdamW runs PyTorch's fused kernel (see `_adamw_kernel`), SGD the
    ``foreach`` kernels (bit-identical to torch's per-parameter loop).

    Args:
        param_groups: ``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]`` or
            plain parameters; every parameter must require gradients.
        opt: optimiser name (case-insensitive), one of ``SUPPORTED_OPTIMIZERS``.
        lr: learning rate (the scheduler overwrites it every epoch).
        momentum: SGD momentum.
        weight_decay: default weight decay of groups that do not set one.
        nesterov: Nesterov momentum for ``sgd``.

    Returns:
        The optimiser.
    """
    name = opt.lower()
    if name not in SUPPORTED_OPTIMIZERS:
        raise ValueError(f"unknown optimizer --opt {opt!r}; supported: {', '.join(SUPPORTED_OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"the learning rate must be positive, got {lr}")
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [dict(g, params=list(g["params"])) for g in groups]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the optimizer got no parameters: nothing is trainable")
    frozen = sum(1 for p in params if not p.requires_grad)
    if frozen:
        raise ValueError(f"{frozen} parameters given to the optimizer do not require gradients; pass trainable ones")

    if name in ("sgd", "nesterov", "momentum"):
        use_nesterov = nesterov and name != "momentum"
        if use_nesterov and momentum <= 0:
            raise ValueError(f"Nesterov SGD needs momentum > 0, got --momentum {momentum}")
        optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=use_nesterov, foreach=True
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **_adamw_kernel(params))
    logger.info(
        "optimizer %s: lr %.6g, groups %s",
        type(optimizer).__name__,
        lr,
        [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups],
    )
    return optimizer


def _adamw_kernel(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """AdamW's implementation: the fused kernel where PyTorch has one for every parameter's device, else foreach.

    torch's default on the CPU is a Python loop over the parameters; the fused kernel computes the same update in one
    pass (equal to float rounding; 3.8x faster on the quickstart's 193 tensors, docs/performance.md).
    """
    fused_devices = ("cpu", "cuda")
    if all(p.device.type in fused_devices and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


# How each learning-rate scaling rule (a method's ``lr_scaling``) turns --lr-base into the learning rate.
LR_SCALING_RULES = {
    "linear": "--lr-base x global batch / 256",
    "sqrt": "--lr-base x sqrt(global batch / 256)",
    "timm": "timm's rule: --lr-base x global batch / 256 for SGD, x its square root for Adam-type optimisers",
    "none": "--lr-base is the learning rate itself, whatever the batch",
}


def resolve_lr(
    lr: float | None,
    lr_base: float,
    global_batch: int,
    opt: str,
    lr_base_size: int = 256,
    lr_base_scale: str = "timm",
) -> float:
    """The learning rate to use: ``lr`` when given, else ``lr_base`` scaled with the global batch by a method's rule.

    Args:
        lr: explicit learning rate (``--lr``) or None.
        lr_base: learning rate at ``lr_base_size`` samples per step (``--lr-base``).
        global_batch: batch per GPU x world size x gradient-accumulation steps.
        opt: optimiser name (the ``timm`` rule reads it).
        lr_base_size: reference batch size of ``lr_base``.
        lr_base_scale: ``linear`` (x global_batch / lr_base_size), ``sqrt`` (x its square root), ``timm`` (timm's
            train.py: ``sqrt`` for ``ada*`` and ``lamb`` optimisers, ``linear`` otherwise) or ``none`` (``lr_base``
            is the learning rate).

    Returns:
        The learning rate.
    """
    if lr is not None:
        return float(lr)
    if global_batch < 1 or lr_base_size < 1:
        raise ValueError(f"global batch ({global_batch}) and --lr-base-size ({lr_base_size}) must be positive")
    if lr_base_scale not in LR_SCALING_RULES:
        raise ValueError(f"learning-rate scaling rule must be one of {tuple(LR_SCALING_RULES)}, got {lr_base_scale!r}")
    scale = lr_base_scale
    if scale == "timm":
        scale = "sqrt" if any(k in opt.lower() for k in ("ada", "lamb")) else "linear"
    ratio = {"linear": global_batch / lr_base_size, "sqrt": math.sqrt(global_batch / lr_base_size), "none": 1.0}[scale]
    resolved = lr_base * ratio
    logger.info(
        "lr %.6g = lr_base %.6g x %.6g (global batch %d, %s rule)", resolved, lr_base, ratio, global_batch, scale
    )
    return resolved


class WarmupScheduler(abc.ABC):
    """Per-epoch learning rate with a linear warm-up; subclasses give the decay after it.

    ``lr(t) = warmup_lr + t · (base_lr − warmup_lr) / warmup_epochs`` for ``t < warmup_epochs``, else
    :meth:`decayed_lr`. A group's ``lr_scale`` key, if present, multiplies its learning rate. The constructor
    finishes with ``self.step(0)`` (a subclass sets what :meth:`decayed_lr` reads before calling it), so the optimiser
    holds ``lr(0)`` once the schedule exists. A schedule with
    :attr:`per_iteration` set is also evaluated before every optimiser step, at ``t = epoch + step / steps``
    (:meth:`step_at`).

    Args:
        optimizer: the optimiser whose groups are set.
        base_lr: peak learning rate.
        epochs: total epochs.
        warmup_epochs: number of warm-up epochs (0 for none).
        warmup_lr: learning rate at epoch 0 of the warm-up.
        min_lr: floor of the decay.
    """

    per_iteration: ClassVar[bool] = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        epochs: int,
        warmup_epochs: int = 5,
        warmup_lr: float = 1e-5,
        min_lr: float = 0.0,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {epochs}")
        if not 0 <= warmup_epochs <= epochs:
            raise ValueError(f"--warmup-epochs must be in [0, --epochs={epochs}], got {warmup_epochs}")
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.epochs = int(epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)
        self.last_epoch = 0
        self.step(0)

    @abc.abstractmethod
    def decayed_lr(self, epoch: float) -> float:
        """Learning rate of an epoch at or after the warm-up.

        Args:
            epoch: the epoch (``>= warmup_epochs``).

        Returns:
            The learning rate.
        """

    def lr_at(self, epoch: float) -> float:
        """Learning rate of epoch ``epoch`` (0-based).

        Args:
            epoch: the epoch.

        Returns:
            The learning rate.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if epoch < self.warmup_epochs:
            return linear_warmup(epoch, self.warmup_lr, self.base_lr, self.warmup_epochs)
        return self.decayed_lr(epoch)

    def step(self, epoch: int) -> float:
        """Set every group's learning rate for ``epoch``.

        Args:
            epoch: the epoch about to be trained.

        Returns:
            The (unscaled) learning rate.
        """
        lr = self.lr_at(epoch)
        set_lr(self.optimizer, lr)
        self.last_epoch = epoch
        return lr

    def step_at(self, progress: float) -> float:
        """Set every group's learning rate at a fractional epoch, before an optimiser step of a per-iteration
        schedule (:attr:`per_iteration`); ``last_epoch`` is left as :meth:`step` set it.

        Args:
            progress: epochs done, ``epoch + step / steps_per_epoch``.

        Returns:
            The (unscaled) learning rate.
        """
        lr = self.lr_at(progress)
        set_lr(self.optimizer, lr)
        return lr

    def get_last_lr(self) -> list[float]:
        """Current learning rate of each group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def _hparams(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
            "warmup_lr": self.warmup_lr,
            "min_lr": self.min_lr,
        }

    def state_dict(self) -> dict:
        """The schedule's settings and ``last_epoch`` (plain types)."""
        return self._hparams() | {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``last_epoch`` and apply its learning rate.

        The settings given to the constructor (i.e. the current command line) stay in force; settings that differ
        from the stored ones are reported with a warning.

        Args:
            state: a dict from :meth:`state_dict`.
        """
        changed = {k: (state[k], v) for k, v in self._hparams().items() if k in state and state[k] != v}
        if changed:
            logger.warning(
                "schedule settings differ from the checkpoint's; using the current ones: %s",
                ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
            )
        self.step(int(state["last_epoch"]))


class CosineWarmupScheduler(WarmupScheduler):
    """Per-epoch learning rate: linear warm-up, then cosine decay counted from epoch 0 (no warm-up prefix).

    ``lr(t) = warmup_lr + t · (base_lr − warmup_lr) / warmup_epochs`` for ``t < warmup_epochs``, else
    ``min_lr + ½ · (base_lr − min_lr) · (1 + cos(π t / epochs))``; ``min_lr`` from ``epochs`` on. A group's
    ``lr_scale`` key, if present, multiplies its learning rate. The constructor applies ``lr(0)``.

    Args:
        optimizer: the optimiser whose groups are set.
        base_lr: peak learning rate.
        epochs: length of the cosine (total epochs).
        warmup_epochs: number of warm-up epochs (0 for none).
        warmup_lr: learning rate at epoch 0 of the warm-up.
        min_lr: floor of the cosine.
    """

    def decayed_lr(self, epoch: float) -> float:
        """Cosine value at ``epoch``; ``min_lr`` from ``epochs`` on.

        Args:
            epoch: the epoch (``>= warmup_epochs``).

        Returns:
            The learning rate.
        """
        if epoch >= self.epochs:
            return self.min_lr
        return cosine_decay(epoch, self.base_lr, self.min_lr, self.epochs)


class StepWarmupScheduler(WarmupScheduler):
    """Per-epoch learning rate: linear warm-up, then ``base_lr`` multiplied by ``decay_rate`` at each milestone.

    ``lr(t) = warmup_lr + t · (base_lr − warmup_lr) / warmup_epochs`` for ``t < warmup_epochs``, else
    ``max(min_lr, base_lr · decay_rate^k)`` with ``k`` the number of milestones ``<= t`` (epochs are 0-based, so
    milestone 5 makes epoch 5 the first decayed one, as ``torch.optim.lr_scheduler.MultiStepLR``). A group's
    ``lr_scale`` key, if present, multiplies its learning rate. The constructor applies ``lr(0)``.

    Example (GB-CosFace's recipe): ``base_lr=0.1, epochs=24, warmup_epochs=0, milestones=(5, 10, 15, 20)`` gives
    0.1 for epochs 0-4, 0.01 for 5-9, 1e-3 for 10-14, 1e-4 for 15-19 and 1e-5 for 20-23.

    Args:
        optimizer: the optimiser whose groups are set.
        base_lr: learning rate after the warm-up, before the first milestone.
        epochs: total epochs.
        milestones: strictly increasing epochs in ``[warmup_epochs, epochs)`` at which the rate is multiplied by
            ``decay_rate``.
        decay_rate: factor in ``(0, 1]`` applied at each milestone.
        warmup_epochs: number of warm-up epochs (0 for none).
        warmup_lr: learning rate at epoch 0 of the warm-up.
        min_lr: floor of the decayed rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        epochs: int,
        milestones: Sequence[int],
        decay_rate: float = 0.1,
        warmup_epochs: int = 5,
        warmup_lr: float = 1e-5,
        min_lr: float = 0.0,
    ) -> None:
        values = list(milestones)
        if any(isinstance(m, bool) or int(m) != m for m in values):
            raise ValueError(f"--decay-milestones must be whole epochs, got {values}")
        values = [int(m) for m in values]
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"--decay-milestones must be strictly increasing, got {values}")
        outside = [m for m in values if not warmup_epochs <= m < epochs]
        if outside:
            raise ValueError(
                f"--decay-milestones must lie in [--warmup-epochs={warmup_epochs}, --epochs={epochs}), "
                f"got {outside} in {values}"
            )
        if not 0 < decay_rate <= 1:
            raise ValueError(f"--decay-rate must be in (0, 1], got {decay_rate}")
        self.milestones = values
        self.decay_rate = float(decay_rate)
        super().__init__(
            optimizer, base_lr=base_lr, epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr
        )

    def decayed_lr(self, epoch: float) -> float:
        """``base_lr`` times ``decay_rate`` per milestone reached, at least ``min_lr``.

        Args:
            epoch: the epoch (``>= warmup_epochs``).

        Returns:
            The learning rate.
        """
        return step_decay(epoch, self.base_lr, self.milestones, self.decay_rate, self.min_lr)

    def _hparams(self) -> dict:
        return super()._hparams() | {"milestones": list(self.milestones), "decay_rate": self.decay_rate}


class PolyWarmupScheduler(WarmupScheduler):
    """Linear warm-up, then polynomial (power 2) decay to ``min_lr`` over the epochs after the warm-up (TransFace's and
    arcface_torch's ``PolyScheduler``).

    ``lr(t) = warmup_lr + t · (base_lr − warmup_lr) / warmup_epochs`` for ``t < warmup_epochs``, else
    ``min_lr + (base_lr − min_lr) · (1 − (t − warmup_epochs) / (epochs − warmup_epochs))²``. The release evaluates it
    at every iteration (``t`` = iterations done / iterations per epoch, warm-up from 0), and so does ours
    (:attr:`per_iteration`: the loop calls :meth:`step_at` before every optimiser step). The constructor applies
    ``lr(0)``.

    Args:
        optimizer: the optimiser whose groups are set.
        base_lr: peak learning rate.
        epochs: total epochs.
        warmup_epochs: number of warm-up epochs (0 for none).
        warmup_lr: learning rate at epoch 0 of the warm-up (0 in the release).
        min_lr: final learning rate (0 in the release).
    """

    per_iteration: ClassVar[bool] = True

    def decayed_lr(self, epoch: float) -> float:
        """``min_lr + (base_lr − min_lr) · (1 − (epoch − warmup_epochs) / (epochs − warmup_epochs))²``."""
        length = max(self.epochs - self.warmup_epochs, 1)
        return poly_decay(epoch - self.warmup_epochs, self.base_lr, self.min_lr, length)


SUPPORTED_SCHEDULERS = ("cosine", "step", "poly")


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    base_lr: float,
    epochs: int,
    warmup_epochs: int = 5,
    warmup_lr: float = 1e-5,
    min_lr: float = 0.0,
    milestones: Sequence[int] = (),
    decay_rate: float = 0.1,
) -> WarmupScheduler:
    """Build the per-epoch learning-rate schedule by name.

    ``cosine`` is :class:`CosineWarmupScheduler` and ``poly`` :class:`PolyWarmupScheduler` (``milestones`` and
    ``decay_rate`` do not apply to them and are reported with a warning when milestones are given); ``step`` is
    :class:`StepWarmupScheduler`.

    Args:
        name: schedule name (case-insensitive), one of ``SUPPORTED_SCHEDULERS``.
        optimizer: the optimiser whose groups are set.
        base_lr: peak learning rate.
        epochs: total epochs.
        warmup_epochs: number of warm-up epochs (0 for none).
        warmup_lr: learning rate at epoch 0 of the warm-up.
        min_lr: floor of the decay.
        milestones: epochs at which ``step`` multiplies the rate by ``decay_rate``.
        decay_rate: factor of ``step`` at each milestone.

    Returns:
        The schedule, already applied for epoch 0.
    """
    key = name.lower()
    common = dict(base_lr=base_lr, epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr)
    if key == "cosine":
        if milestones:
            logger.warning("--decay-milestones %s do not apply to the cosine schedule; ignored", list(milestones))
        scheduler: WarmupScheduler = CosineWarmupScheduler(optimizer, **common)
    elif key == "step":
        scheduler = StepWarmupScheduler(optimizer, milestones=milestones, decay_rate=decay_rate, **common)
    elif key == "poly":
        if milestones:
            logger.warning("--decay-milestones %s do not apply to the poly schedule; ignored", list(milestones))
        scheduler = PolyWarmupScheduler(optimizer, **common)
    else:
        raise ValueError(
            f"unknown learning-rate schedule --sched {name!r}; supported: {', '.join(SUPPORTED_SCHEDULERS)}"
        )
    logger.info("lr schedule %s: %s", type(scheduler).__name__, scheduler.state_dict())
    return scheduler
