"""Schedule formulas shared by the loop's per-epoch lr schedulers and DINO's per-iteration schedules.

``trainer/optim.py`` evaluates them at one epoch (:func:`linear_warmup`, :func:`cosine_decay`, :func:`step_decay`,
:func:`poly_decay`);
DINO (``model/dino.py``) builds whole per-iteration arrays with :func:`cosine_schedule`. :func:`set_lr` writes a
learning rate into an optimiser's groups for both.

References:
    - timm ``timm/scheduler/cosine_lr.py`` (cosine with linear warm-up) and PyTorch
      ``torch.optim.lr_scheduler.MultiStepLR`` (milestone semantics of the step decay).
    - DINO (Caron et al., ICCV 2021), facebookresearch/dino ``utils.py`` (``cosine_scheduler``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T", float, np.ndarray)


def linear_warmup(t: T, start: float, end: float, length: float) -> T:
    """Linear ramp from ``start`` at ``t = 0`` to ``end`` at ``t = length``: ``start + t · (end − start) / length``.

    Args:
        t: position(s) on the ramp (a float or an array).
        start: value at ``t = 0``.
        end: value at ``t = length``.
        length: ramp length (positive).

    Returns:
        The value(s), of ``t``'s kind.
    """
    return start + t * (end - start) / length


def cosine_decay(t: T, base: float, final: float, length: float) -> T:
    """Half cosine from ``base`` at ``t = 0`` to ``final`` at ``t = length``.

    ``final + ½ · (base − final) · (1 + cos(π t / length))``; a float ``t`` is evaluated with ``math.cos`` and gives
    a float, an array with ``np.cos`` and gives an array.

    Args:
        t: position(s) on the cosine.
        base: value at ``t = 0``.
        final: value at ``t = length``.
        length: cosine length (positive).

    Returns:
        The value(s), of ``t``'s kind.
    """
    phase = math.pi * t / length
    cos = np.cos(phase) if isinstance(phase, np.ndarray) else math.cos(phase)
    return final + 0.5 * (base - final) * (1.0 + cos)


def poly_decay(t: float, base: float, final: float, length: float, power: float = 2.0) -> float:
    """Polynomial decay from ``base`` at ``t = 0`` to ``final`` at ``t = length`` (``final`` beyond):
    ``final + (base − final) · (1 − t / length)^power``.

    Args:
        t: position on the decay (non-negative).
        base: value at ``t = 0``.
        final: value from ``t = length`` on.
        length: decay length (positive).
        power: exponent (TransFace's and arcface_torch's PolyScheduler use 2).

    Returns:
        The value.
    """
    return final + (base - final) * max(0.0, 1.0 - t / length) ** power


def step_decay(t: float, base: float, milestones: Sequence[int], rate: float, floor: float = 0.0) -> float:
    """``base`` multiplied by ``rate`` once per milestone ``<= t``, at least ``floor``.

    Milestone m makes ``t = m`` the first decayed position, as ``torch.optim.lr_scheduler.MultiStepLR``.

    Args:
        t: position (e.g. a 0-based epoch).
        base: value before the first milestone.
        milestones: positions at which the value is multiplied by ``rate``.
        rate: factor per milestone.
        floor: lower bound of the value.

    Returns:
        The value.
    """
    reached = sum(1 for m in milestones if m <= t)
    return max(floor, base * rate**reached)


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up, then a cosine from ``base`` to ``final`` (DINO's ``cosine_scheduler``).

    With W = warmup_epochs * steps_per_epoch warm-up iterations and N = epochs * steps_per_epoch - W others, the
    warm-up is ``np.linspace(start_warmup, base, W)`` (both ends included, DINO's arithmetic) and iteration W + i of
    the rest is ``cosine_decay(i, base, final, N)``, so the last value is just short of ``final``.

    Args:
        base: value at the end of the warm-up (the peak).
        final: value the cosine tends to.
        epochs: total epochs.
        steps_per_epoch: iterations per epoch.
        warmup_epochs: epochs of linear warm-up (0 for none).
        start_warmup: first warm-up value.

    Returns:
        float64 array of length ``epochs * steps_per_epoch``.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"cosine_schedule needs epochs >= 1 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    warmup_iters = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * steps_per_epoch - warmup_iters)
    return np.concatenate((warmup, cosine_decay(iters, base, final, max(len(iters), 1))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr``, times the group's ``lr_scale`` key where it has one.

    Args:
        optimizer: the optimiser.
        lr: the (unscaled) learning rate.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
