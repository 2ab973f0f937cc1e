"""Hungarian clustering accuracy for generalized category discovery (All / Old / New).

Implements the metric table of docs/method.md (section 12): a square contingency matrix of side
max(max y_pred, max y_true) + 1 built with one ``bincount``, a maximising Hungarian matching
(``scipy.optimize.linear_sum_assignment``), and three ways to split the result into known (old) and unknown (new)
identities:

- ``v2`` (headline): one matching on the whole set; Old / New count the correctly matched samples of old / new classes.
- ``v1``: Old and New each get their own matching; All = rho * Old + (1 - rho) * New with rho the old fraction.
- ``v2b``: the ``v2`` matching, but Old / New / All are means of per-class accuracies (class-balanced).

References: GCD (Vaze et al., CVPR 2022), ``project_utils/cluster_and_log_utils.py``.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]


class MetricVariant(str, Enum):
    """How the matched counts are split into All / Old / New (docs/method.md, section 12)."""

    V1 = "v1"
    V2 = "v2"
    V2_BALANCED = "v2b"


class SplitAccuracy(NamedTuple):
    """Accuracy on a whole set and on its old / new subsets; None where the subset is empty."""

    all: float
    old: float | None
    new: float | None


def _to_numpy(values: ArrayLike, name: str, dtype: type) -> np.ndarray:
    """Convert a tensor / array / sequence to a flat numpy array of ``dtype``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if dtype is bool:
        if arr.dtype != bool:
            raise ValueError(f"{name} must be a boolean mask, got dtype {arr.dtype}")
        return arr
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must hold non-negative labels, got minimum {arr.min()}")
    return arr


def _check_inputs(
    y_true: ArrayLike, y_pred: ArrayLike, known_mask: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate and convert labels (and the optional known mask) to numpy."""
    yt = _to_numpy(y_true, "y_true", np.int64)
    yp = _to_numpy(y_pred, "y_pred", np.int64)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {yt.shape[0]} and {yp.shape[0]}")
    if yt.size == 0:
        raise ValueError("cannot score an empty set (y_true has no element)")
    mask = None
    if known_mask is not None:
        mask = _to_numpy(known_mask, "known_mask", bool)
        if mask.shape != yt.shape:
            raise ValueError(f"known_mask must have the length of y_true ({yt.shape[0]}), got {mask.shape[0]}")
    return yt, yp, mask


def contingency_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Square count matrix w[k, c] = #{i : y_pred_i = k, y_true_i = c}.

    Args:
        y_true: (n,) non-negative int64 class labels.
        y_pred: (n,) non-negative int64 cluster indices.

    Returns:
        (S, S) int64 matrix with S = max(max y_pred, max y_true) + 1.
    """
    side = int(max(y_pred.max(), y_true.max())) + 1
    return np.bincount(y_pred * side + y_true, minlength=side * side).reshape(side, side)


def _match(w: np.ndarray) -> np.ndarray:
    """Maximising one-to-one matching; returns ``cluster_of[c]`` = the cluster matched to class c."""
    rows, cols = linear_sum_assignment(w, maximize=True)
    cluster_of = np.empty(w.shape[1], dtype=np.int64)
    cluster_of[cols] = rows
    return cluster_of


def cluster_acc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Hungarian clustering accuracy: the best one-to-one cluster -> class map, as a fraction of samples.

    Args:
        y_true: (n,) class labels (tensor, array or sequence of non-negative ints).
        y_pred: (n,) cluster indices.

    Returns:
        Accuracy in [0, 1].
    """
    yt, yp, _ = _check_inputs(y_true, y_pred)
    w = contingency_matrix(yt, yp)
    cluster_of = _match(w)
    return float(w[cluster_of, np.arange(w.shape[1])].sum() / yt.size)


def _warn_missing(known: np.ndarray) -> None:
    """Log a warning when the evaluated set has no old or no new sample."""
    if not known.any():
        logger.warning("the evaluated set has no sample of a known (old) class: Old accuracy is reported as None")
    if known.all():
        logger.warning("the evaluated set has no sample of an unknown (new) class: New accuracy is reported as None")


def split_cluster_acc_v1(y_true: ArrayLike, y_pred: ArrayLike, known_mask: ArrayLike) -> SplitAccuracy:
    """v1 accuracy: separate matchings on the old and the new samples, All = rho * Old + (1 - rho) * New.

    Args:
        y_true: (n,) class labels.
        y_pred: (n,) cluster indices.
        known_mask: (n,) bool, True for samples of known (old) classes.

    Returns:
        ``SplitAccuracy(all, old, new)``; an empty subset gives None (and All is the other subset's accuracy).
    """
    yt, yp, known = _check_inputs(y_true, y_pred, known_mask)
    _warn_missing(known)
    old = cluster_acc(yt[known], yp[known]) if known.any() else None
    new = cluster_acc(yt[~known], yp[~known]) if not known.all() else None
    rho = float(known.mean())
    total = rho * (old if old is not None else 0.0) + (1.0 - rho) * (new if new is not None else 0.0)
    return SplitAccuracy(total, old, new)


def _v2_matched(
    y_true: ArrayLike, y_pred: ArrayLike, known_mask: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared v2 work: per-class matched counts and sizes, and which classes are old / new."""
    yt, yp, known = _check_inputs(y_true, y_pred, known_mask)
    _warn_missing(known)
    w = contingency_matrix(yt, yp)
    cluster_of = _match(w)
    classes = np.arange(w.shape[1])
    matched = w[cluster_of, classes]
    sizes = w.sum(axis=0)
    old_classes = np.zeros(w.shape[1], dtype=bool)
    old_classes[np.unique(yt[known])] = True
    new_classes = np.zeros(w.shape[1], dtype=bool)
    new_classes[np.unique(yt[~known])] = True
    return matched, sizes, old_classes, new_classes


def split_cluster_acc_v2(y_true: ArrayLike, y_pred: ArrayLike, known_mask: ArrayLike) -> SplitAccuracy:
    """v2 accuracy (headline): one matching on the whole set, then split by the true class.

    Args:
        y_true: (n,) class labels.
        y_pred: (n,) cluster indices.
        known_mask: (n,) bool, True for samples of known (old) classes.

    Returns:
        ``SplitAccuracy(all, old, new)``; an empty subset gives None.
    """
    matched, sizes, old_classes, new_classes = _v2_matched(y_true, y_pred, known_mask)
    total = float(matched.sum() / sizes.sum())
    old = float(matched[old_classes].sum() / sizes[old_classes].sum()) if old_classes.any() else None
    new = float(matched[new_classes].sum() / sizes[new_classes].sum()) if new_classes.any() else None
    return SplitAccuracy(total, old, new)


def split_cluster_acc_v2_balanced(y_true: ArrayLike, y_pred: ArrayLike, known_mask: ArrayLike) -> SplitAccuracy:
    """Class-balanced v2: the v2 matching, then the mean of per-class accuracies.

    Args:
        y_true: (n,) class labels.
        y_pred: (n,) cluster indices.
        known_mask: (n,) bool, True for samples of known (old) classes.

    Returns:
        ``SplitAccuracy(all, old, new)``: means over the old, new and all present classes; None for an empty subset.
    """
    matched, sizes, old_classes, new_classes = _v2_matched(y_true, y_pred, known_mask)
    present = old_classes | new_classes
    per_class = np.zeros(sizes.shape, dtype=np.float64)
    per_class[present] = matched[present] / sizes[present]
    total = float(per_class[present].mean())
    old = float(per_class[old_classes].mean()) if old_classes.any() else None
    new = float(per_class[new_classes].mean()) if new_classes.any() else None
    return SplitAccuracy(total, old, new)


METRIC_FUNCS = {
    MetricVariant.V1: split_cluster_acc_v1,
    MetricVariant.V2: split_cluster_acc_v2,
    MetricVariant.V2_BALANCED: split_cluster_acc_v2_balanced,
}


def parse_variant(name: str | MetricVariant) -> MetricVariant:
    """Map ``"v1"`` / ``"v2"`` / ``"v2b"`` to a ``MetricVariant``; anything else raises ValueError."""
    try:
        return MetricVariant(name)
    except ValueError:
        valid = ", ".join(v.value for v in MetricVariant)
        raise ValueError(f"unknown clustering metric {name!r}; expected one of: {valid}") from None


def evaluate_clustering(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    known_mask: ArrayLike,
    eval_funcs: Sequence[str | MetricVariant] = ("v2", "v1"),
) -> dict[str, dict[str, float | None]]:
    """Score a clustering with several metric variants.

    Args:
        y_true: (n,) class labels.
        y_pred: (n,) cluster indices.
        known_mask: (n,) bool, True for samples of known (old) classes.
        eval_funcs: variant names (``"v1"``, ``"v2"``, ``"v2b"``), in the order wanted in the result.

    Returns:
        ``{variant: {"all": a, "old": o, "new": n}}`` with None for an empty old / new subset.
    """
    variants = [parse_variant(name) for name in eval_funcs]
    return {v.value: METRIC_FUNCS[v](y_true, y_pred, known_mask)._asdict() for v in variants}
