"""Estimate the number of clusters K from the labelled subset (GCD's ``estimate_k``; docs/method.md, section 10).

For a candidate K, plain k-means (``utils.kmeans.kmeans``: labels unused) clusters ALL training features, labelled
and unlabelled; the objective is the Hungarian clustering accuracy of the LABELLED points only (their clusters
against their class labels). No ground truth of the unlabelled points is read. Every candidate is clustered with the
same seed and restarts, so the objective is a deterministic function of K, and each integer K is clustered at most
once (results are cached).

Two searches over the integers [min_k, max_k] (min_k defaults to the number M of labelled classes):

- ``brent`` (default, GCD's ``scipy_optimise``): ``scipy.optimize.minimize_scalar(method="bounded")`` on
  -accuracy(round(K)) over [min_k - 0.5, max_k + 0.5], so that both bounds can be reached by rounding (GCD truncated
  K with ``int`` over [M, max], so its upper bound was never evaluated). ``xatol`` = 3 keeps each trial point on an
  integer other than the current best's (see ``brent_search``), and a climb to the better integer neighbour ends the
  search. About log(width / 4) / log(1.618) + 3 candidates (at most 17 over [1000, 4000] on a V-shaped curve).
- ``binary``: bisection on the sign of the discrete slope. While lo < hi: mid = (lo + hi) // 2; if
  acc(mid) >= acc(mid + 1) the peak lies in [lo, mid], else in [mid + 1, hi]. For a unimodal accuracy curve this
  ends exactly at the peak (ties go to the smaller K) after at most 2 * ceil(log2(max_k - min_k + 1)) candidates.
  GCD's ``binary_search`` differs: it evaluates both ends and the midpoint, then, log2(width) times, moves whichever
  END has the lower accuracy to the midpoint and evaluates the new midpoint. Comparing the ends does not locate the
  peak of a unimodal curve (a peak near the low end with a slow decline towards the high end can be cut away), which
  is why ours compares neighbours at the midpoint instead.

The chosen K is the evaluated candidate with the highest labelled accuracy (ties: the smaller K). For a strictly
unimodal curve it is where the search ended; where an evaluated K scored higher than that end, a warning names both.

Distributed: every rank passes its shard of the rows; k-means is collective, the labelled predictions are gathered
so that every rank computes the same accuracy and the search visits the same candidates on all ranks.

References: Vaze et al., "Generalized Category Discovery", CVPR 2022, ``methods/estimate_k/estimate_k.py``;
Brent, "Algorithms for Minimization without Derivatives", 1973 (``scipy.optimize.fminbound``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from scipy.optimize import minimize_scalar
from tqdm import tqdm

from utils.distributed import all_gather_variable, all_reduce_sum, is_primary
from utils.evaluation.clustering import cluster_acc
from utils.kmeans import DEFAULT_CHUNK_BYTES, kmeans

logger = logging.getLogger(__name__)

SEARCHES = ("brent", "binary")
BRENT_XATOL = 3.0  # Brent's absolute tolerance: trial points stay >= xatol / 3 = 1 from the best (another integer)

Objective = Callable[[int], float]


@dataclass
class KEstimate:
    """Outcome of a K search.

    Attributes:
        k: the chosen K (highest labelled accuracy among the evaluated candidates; ties: the smaller K).
        search: ``"brent"`` or ``"binary"``.
        min_k: lower bound of the search (inclusive).
        max_k: upper bound of the search (inclusive).
        evaluated: (K, labelled accuracy) of every clustered candidate, in evaluation order.
        num_labelled: number of labelled points scored.
        num_labelled_classes: number M of classes among them.
        seconds: wall time of the search.
    """

    k: int
    search: str
    min_k: int
    max_k: int
    evaluated: list[tuple[int, float]]
    num_labelled: int
    num_labelled_classes: int
    seconds: float

    def to_dict(self) -> dict:
        """JSON-friendly form (``evaluated`` as a list of ``{"K", "labelled_acc"}``)."""
        return {
            "K": self.k,
            "search": self.search,
            "min_K": self.min_k,
            "max_K": self.max_k,
            "evaluated": [{"K": k, "labelled_acc": acc} for k, acc in self.evaluated],
            "num_labelled": self.num_labelled,
            "num_labelled_classes": self.num_labelled_classes,
            "seconds": self.seconds,
        }


class CachedObjective:
    """An integer objective evaluated at most once per K; remembers every value in evaluation order.

    Args:
        fn: K -> score (higher is better).
        on_new: called with (K, score) after each new evaluation (progress, logging).
    """

    def __init__(self, fn: Objective, on_new: Callable[[int, float], None] | None = None) -> None:
        self._fn = fn
        self._on_new = on_new
        self.values: dict[int, float] = {}

    def __call__(self, k: int) -> float:
        if k not in self.values:
            self.values[k] = float(self._fn(k))
            if self._on_new is not None:
                self._on_new(k, self.values[k])
        return self.values[k]

    def best(self) -> int:
        """The evaluated K with the highest score, the smallest such K on ties."""
        if not self.values:
            raise ValueError("no K has been evaluated yet")
        return min(self.values, key=lambda k: (-self.values[k], k))


def _check_bounds(lo: int, hi: int) -> None:
    if lo < 1 or hi <= lo:
        raise ValueError(f"need 1 <= lower bound < upper bound for a K search, got [{lo}, {hi}]")


def brent_search(objective: Objective, lo: int, hi: int) -> int:
    """Bounded Brent minimisation of -objective(round(K)) over [lo - 0.5, hi + 0.5] (GCD's search), then a climb
    to the best integer neighbour.

    The rounded objective is constant within each integer, and Brent's method treats an equal value as progress: a
    trial point inside the integer of the current best ties with it and cuts the bracket on the far side of the
    best. With scipy's default ``xatol`` (GCD's call) the bracket then shrinks onto one integer, possibly not the peak,
    after as few as three distinct candidates. ``xatol`` = ``BRENT_XATOL`` (3) keeps every trial point at least
    xatol / 3 = 1 away from the current best, hence on another integer; Brent stops once its bracket is about 4 wide,
    and the climb then evaluates the neighbours K - 1 and K + 1 of the best K, moving while one is strictly better.

    Args:
        objective: integer K -> score to maximise; should be cached, since Brent and the climb revisit integers.
        lo: smallest candidate K.
        hi: largest candidate K.

    Returns:
        The K the climb ended at (the peak of a unimodal objective).
    """
    _check_bounds(lo, hi)

    def to_int(x: float) -> int:
        return min(max(math.floor(x + 0.5), lo), hi)

    res = minimize_scalar(
        lambda x: -objective(to_int(x)), bounds=(lo - 0.5, hi + 0.5), method="bounded", options={"xatol": BRENT_XATOL}
    )
    k = to_int(res.x)
    while True:
        neighbours = [c for c in (k - 1, k + 1) if lo <= c <= hi]
        better = max(neighbours, key=lambda c: (objective(c), -c))
        if objective(better) <= objective(k):
            return k
        k = better


def binary_search(objective: Objective, lo: int, hi: int) -> int:
    """Peak bisection over the integers [lo, hi], assuming the objective is unimodal.

    While lo < hi, compare the objective at mid = (lo + hi) // 2 and mid + 1: if objective(mid) >= objective(mid + 1)
    keep [lo, mid], else keep [mid + 1, hi]. At most 2 * ceil(log2(hi - lo + 1)) evaluations.

    Args:
        objective: integer K -> score to maximise.
        lo: smallest candidate K.
        hi: largest candidate K.

    Returns:
        The K the interval shrank to (the peak of a unimodal objective; ties resolved towards smaller K).
    """
    _check_bounds(lo, hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if objective(mid) >= objective(mid + 1):
            hi = mid
        else:
            lo = mid + 1
    return lo


SEARCH_FUNCS: dict[str, Callable[[Objective, int, int], int]] = {"brent": brent_search, "binary": binary_search}


def estimate_k(
    x: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    max_k: int,
    min_k: int | None = None,
    *,
    search: str = "brent",
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "k-means++",
    device: str | torch.device | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
) -> KEstimate:
    """GCD's K estimate: the K whose plain k-means of all points best clusters the labelled points.

    In a process group every rank passes its own shard of the rows and gets the same estimate.

    Args:
        x: (n, D) features of this rank, labelled and unlabelled.
        labels: (n,) integer class ids; only the labelled rows are read.
        labelled_mask: (n,) bool, True for labelled rows.
        max_k: largest candidate K (inclusive); at most the global number of points.
        min_k: smallest candidate K (inclusive; default and minimum: the number M of labelled classes).
        search: ``"brent"`` (bounded Brent, GCD's default) or ``"binary"`` (peak bisection).
        n_init: k-means restarts per candidate (the lowest inertia wins).
        max_iter: Lloyd iteration cap per restart.
        tol: k-means stopping tolerance, as in ``utils.kmeans.kmeans``.
        seed: base seed, the same for every candidate.
        init: seeding, ``"k-means++"`` or ``"k-means||"``.
        device: compute device of k-means; the labelled predictions are gathered on it (default: the device of
            ``x``; under NCCL pass the CUDA device).
        chunk_bytes: memory budget of one (rows, K) float32 distance block.
        progress: tqdm bar over the candidates on rank 0.

    Returns:
        ``KEstimate`` with the chosen K and every evaluated (K, labelled accuracy).
    """
    if search not in SEARCH_FUNCS:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}; got {search!r}")
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (n, D) tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    labelled_mask = torch.as_tensor(labelled_mask).cpu()
    labels = torch.as_tensor(labels).cpu()
    if labelled_mask.dtype != torch.bool or labelled_mask.shape != (n,):
        raise ValueError(
            f"labelled_mask must be a bool tensor of shape ({n},), got {labelled_mask.dtype} "
            f"{tuple(labelled_mask.shape)}"
        )
    if labels.shape != (n,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
    gather_device = torch.device(device) if device is not None else x.device
    targets = torch.cat(all_gather_variable(labels[labelled_mask].to(gather_device, torch.int64))).cpu()
    n_total = int(all_reduce_sum(torch.tensor([n], dtype=torch.int64, device=gather_device)).item())
    if targets.numel() == 0:
        raise ValueError("K estimation needs labelled points: labelled_mask selects none")
    num_classes = int(torch.unique(targets).numel())
    min_k = num_classes if min_k is None else min_k
    if min_k < num_classes:
        raise ValueError(
            f"min_k={min_k} is below the number of labelled classes M={num_classes}: with fewer clusters than "
            "labelled classes the labelled accuracy cannot peak; need min_k >= M"
        )
    if max_k <= min_k:
        raise ValueError(f"max_k={max_k} must exceed min_k={min_k} (the search range [min_k, max_k] is empty)")
    if max_k > n_total:
        raise ValueError(f"max_k={max_k} exceeds the number of points ({n_total})")

    def labelled_accuracy(k: int) -> float:
        result = kmeans(
            x,
            k,
            n_init,
            max_iter,
            tol,
            seed,
            init=init,
            device=device,
            chunk_bytes=chunk_bytes,
            progress=False,
        )
        pred = torch.cat(all_gather_variable(result.labels[labelled_mask].to(gather_device))).cpu()
        return cluster_acc(targets, pred)

    start = time.perf_counter()
    bar = tqdm(desc=f"K estimation ({search})", unit=" candidates", disable=not (progress and is_primary()))

    def report(k: int, acc: float) -> None:
        logger.info("K estimation: K=%d, labelled accuracy %.4f", k, acc)
        bar.update(1)
        bar.set_postfix(K=k, acc=f"{acc:.4f}")

    objective = CachedObjective(labelled_accuracy, report)
    try:
        ended_at = SEARCH_FUNCS[search](objective, min_k, max_k)
    finally:
        bar.close()
    chosen = objective.best()
    if objective.values[chosen] > objective.values[ended_at]:
        logger.warning(
            "the %s search ended at K=%d (labelled accuracy %.4f) but K=%d scored higher (%.4f): the accuracy curve "
            "is not unimodal; using K=%d",
            search,
            ended_at,
            objective.values[ended_at],
            chosen,
            objective.values[chosen],
            chosen,
        )
    elif chosen != ended_at:
        logger.info(
            "K=%d and K=%d tie at the best labelled accuracy; using the smaller, K=%d", chosen, ended_at, chosen
        )
    estimate = KEstimate(
        k=chosen,
        search=search,
        min_k=min_k,
        max_k=max_k,
        evaluated=list(objective.values.items()),
        num_labelled=int(targets.numel()),
        num_labelled_classes=num_classes,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "K estimation (%s over [%d, %d]): K=%d with labelled accuracy %.4f after %d candidates in %.1f s",
        search,
        min_k,
        max_k,
        chosen,
        objective.values[chosen],
        len(estimate.evaluated),
        estimate.seconds,
    )
    return estimate


def plot_k_estimation(estimate: KEstimate, out_png: str | Path, true_k: int | None = None) -> Path:
    """Labelled accuracy against K: the evaluated candidates, the chosen K and (when known) the true K.

    Args:
        estimate: the search outcome.
        out_png: output image path.
        true_k: the ground-truth number of classes, marked when given.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure  # lazy: only the figure needs matplotlib (renders with Agg)

    points = sorted(estimate.evaluated)
    ks = [k for k, _ in points]
    accs = [acc for _, acc in points]
    best = dict(points)[estimate.k]

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(ks, accs, marker="o", color="tab:blue", label=f"evaluated ({len(points)})")
    ax.axvline(estimate.k, color="tab:green", linestyle="-", alpha=0.6)
    ax.plot([estimate.k], [best], marker="*", markersize=16, color="tab:green", label=f"chosen K = {estimate.k}")
    if true_k is not None:
        ax.axvline(true_k, color="tab:red", linestyle="--", label=f"true K = {true_k}")
    ax.set_xlim(estimate.min_k - 0.5, estimate.max_k + 0.5)
    ax.set_xlabel("K")
    ax.set_ylabel("labelled clustering accuracy")
    ax.set_title(
        f"K estimation ({estimate.search} over [{estimate.min_k}, {estimate.max_k}], "
        f"M = {estimate.num_labelled_classes})"
    )
    ax.legend(loc="best")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    logger.info("wrote %s", out_png)
    return out_png
