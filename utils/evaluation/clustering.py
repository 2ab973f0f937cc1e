"""Hungarian clustering accuracy for generalized category discovery (All / Old / New).

Implements the metric table of docs/method.md (section 12): a square contingency matrix of side
max(max y_pred, max y_true) + 1 built with one ``bincount``, a maximising Hungarian matching
(``scipy.optimize.linear_sum_assignment``), and three ways to split the result into known (old) and unknown (new)
identities:

- ``v2`` (headline): one matching on the whole set; Old / New count the correctly matched samples of old / new classes.
- ``v1``: Old and New each get their own matching; All = rho * Old + (1 - rho) * New with rho the old fraction.
- ``v2b``: the ``v2`` matching, but Old / New / All are means of per-class accuracies (class-balanced).

Alongside, the face-clustering scores of ``clustering_scores``: pairwise and BCubed precision / recall / F-score, NMI
and ARI, all computed from the non-zero cells of the contingency table (no pair loops).

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


class PrecisionRecallF(NamedTuple):
    """Precision, recall and their harmonic mean (F-score)."""

    precision: float
    recall: float
    f: float


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


class _Cells(NamedTuple):
    """Non-zero contingency cells n_kc with the sizes a_k / b_c of their cluster / class, and the marginals."""

    counts: np.ndarray
    cluster_size: np.ndarray
    class_size: np.ndarray
    cluster_sizes: np.ndarray
    class_sizes: np.ndarray
    num_samples: int


def _cells(y_true: ArrayLike, y_pred: ArrayLike) -> _Cells:
    """Sparse contingency table: O(n log n) time and O(n) memory whatever the number of labels.

    The dense ``contingency_matrix`` has side**2 entries, too many for 10^5 identities; here labels are compacted and
    only the occupied (cluster, class) cells are counted.
    """
    yt, yp, _ = _check_inputs(y_true, y_pred)
    classes, t = np.unique(yt, return_inverse=True)
    clusters, p = np.unique(yp, return_inverse=True)
    cell, counts = np.unique(p * classes.size + t, return_counts=True)
    cluster_sizes = np.bincount(p, minlength=clusters.size)
    class_sizes = np.bincount(t, minlength=classes.size)
    return _Cells(
        counts=counts,
        cluster_size=cluster_sizes[cell // classes.size],
        class_size=class_sizes[cell % classes.size],
        cluster_sizes=cluster_sizes,
        class_sizes=class_sizes,
        num_samples=int(yt.size),
    )


def _pairs(sizes: np.ndarray) -> int:
    """Exact sum of C(x, 2) over ``sizes``."""
    return int((sizes * (sizes - 1) // 2).sum())


def _harmonic(precision: float, recall: float) -> PrecisionRecallF:
    """Bundle precision and recall with their harmonic mean; F = 0 when both are 0."""
    total = precision + recall
    return PrecisionRecallF(precision, recall, 2.0 * precision * recall / total if total > 0 else 0.0)


def _pairwise(cells: _Cells) -> PrecisionRecallF:
    """Pairwise P / R / F of ``pairwise_scores``."""
    same_both = _pairs(cells.counts)
    predicted, true = _pairs(cells.cluster_sizes), _pairs(cells.class_sizes)
    precision = same_both / predicted if predicted else 1.0
    recall = same_both / true if true else 1.0
    return _harmonic(precision, recall)


def _bcubed(cells: _Cells) -> PrecisionRecallF:
    """BCubed P / R / F of ``bcubed_scores``."""
    squared = cells.counts.astype(np.float64) ** 2
    precision = float((squared / cells.cluster_size).sum() / cells.num_samples)
    recall = float((squared / cells.class_size).sum() / cells.num_samples)
    return _harmonic(precision, recall)


def _entropy(sizes: np.ndarray, n: int) -> float:
    """Shannon entropy (nats) of a partition given its set sizes."""
    prob = sizes[sizes > 0] / n
    return float(-(prob * np.log(prob)).sum())


def _nmi(cells: _Cells) -> float:
    """NMI of ``normalized_mutual_info``; MI clipped at 0 and the ratio at 1 against rounding."""
    n = cells.num_samples
    h_true, h_pred = _entropy(cells.class_sizes, n), _entropy(cells.cluster_sizes, n)
    if h_true == 0.0 and h_pred == 0.0:
        return 1.0
    counts = cells.counts.astype(np.float64)
    ratio = counts * n / (cells.cluster_size.astype(np.float64) * cells.class_size)
    mutual = max(float((counts / n * np.log(ratio)).sum()), 0.0)
    return min(mutual / ((h_true + h_pred) / 2.0), 1.0)


def _ari(cells: _Cells) -> float:
    """ARI of ``adjusted_rand_index``."""
    # ARI = (index - expected) / (max - expected) with index = sum C(n_kc, 2), expected = P * T / C(n, 2) and
    # max = (P + T) / 2; multiplied through by 2 C(n, 2) and evaluated on exact Python integers.
    index = _pairs(cells.counts)
    predicted, true = _pairs(cells.cluster_sizes), _pairs(cells.class_sizes)
    total = cells.num_samples * (cells.num_samples - 1) // 2
    numerator = 2 * (index * total - predicted * true)
    denominator = (predicted + true) * total - 2 * predicted * true
    return numerator / denominator if denominator else 1.0


def pairwise_scores(y_true: ArrayLike, y_pred: ArrayLike) -> PrecisionRecallF:
    """Pairwise precision / recall / F over same-cluster and same-class pairs.

    Precision = sum C(n_kc, 2) / sum C(a_k, 2), recall = sum C(n_kc, 2) / sum C(b_c, 2). Convention for 0 / 0:
    precision is 1 without predicted pairs (all singletons), recall is 1 without true pairs; F = 0 when P + R = 0.
    """
    return _pairwise(_cells(y_true, y_pred))


def bcubed_scores(y_true: ArrayLike, y_pred: ArrayLike) -> PrecisionRecallF:
    """BCubed precision = (1/n) sum n_kc^2 / a_k, recall = (1/n) sum n_kc^2 / b_c, and their F-score."""
    return _bcubed(_cells(y_true, y_pred))


def normalized_mutual_info(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """NMI: mutual information over the arithmetic mean of the two entropies; 1.0 when both entropies are 0."""
    return _nmi(_cells(y_true, y_pred))


def adjusted_rand_index(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Hubert & Arabie adjusted Rand index in [-1, 1]; 1.0 when the expected index equals the maximum."""
    return _ari(_cells(y_true, y_pred))


def clustering_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """All face-clustering scores from one contingency table.

    Args:
        y_true: (n,) class labels.
        y_pred: (n,) cluster indices.

    Returns:
        ``{"pairwise_precision", "pairwise_recall", "pairwise_f", "bcubed_precision", "bcubed_recall", "bcubed_f",
        "nmi", "ari"}`` as floats.
    """
    cells = _cells(y_true, y_pred)
    pairwise, bcubed = _pairwise(cells), _bcubed(cells)
    return {
        **{f"pairwise_{key}": value for key, value in pairwise._asdict().items()},
        **{f"bcubed_{key}": value for key, value in bcubed._asdict().items()},
        "nmi": _nmi(cells),
        "ari": _ari(cells),
    }
