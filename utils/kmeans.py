"""Semi-supervised and plain k-means in PyTorch, on one device or sharded over ranks (docs/method.md, section 11).

``semi_supervised_kmeans`` is GCD's ``fit_mix``: labelled class means are the first M centres, labelled points stay
pinned to their class's cluster, the other K - M centres come from k-means++ D^2 sampling over the unlabelled points,
and Lloyd iterations assign each unlabelled point to the nearest of all K centres. ``kmeans`` is the same loop without
labelled points (uniform first centre, D^2 sampling over all points). Fixes and efficiency over the reference:

- empty clusters are reseeded at the unlabelled points farthest from their own centre (no NaN centres);
- restart r draws from a ``torch.Generator`` seeded with ``seed + r``, identical on every rank;
- distances are ||x||^2 + ||c||^2 - 2 x.c^T with one GEMM per row chunk, k-means++ keeps an incremental
  min-distance vector, centre sums use ``index_add_`` and counts ``bincount``;
- distributed: every rank passes its shard of the rows; sums, counts and inertia are all-reduced each iteration, and
  k-means++ finds the rank owning the sampled threshold, which broadcasts the chosen point.

``init="k-means||"`` replaces the k - M sequential D^2 draws with a few oversampling rounds (Bahmani et al., "Scalable
K-Means++", VLDB 2012): each point is kept with probability min(1, 2K d(x) / phi) from uniforms indexed by its global
position, the kept points of all ranks become weighted candidates, and weighted k-means++ on them gives the centres.

The global order of the points (used by k-means++ and by tie-breaking) is the rank-major concatenation of the shards,
so a run on contiguous shards (``contiguous_shard``) reproduces the single-process run up to float summation order.

References: GCD (Vaze et al., CVPR 2022) ``methods/clustering/faster_mix_k_means_pytorch.py``; scikit-learn
``sklearn/cluster/_kmeans.py`` (k-means++ and empty-cluster relocation); Bahmani et al., VLDB 2012 (k-means||).
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Iterator

import torch
from tqdm import tqdm

from utils.distributed import all_gather_variable, all_reduce_sum, broadcast, get_rank, get_world_size, is_primary

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 * 2**20
INITS = ("k-means++", "k-means||")
KMEANS_PARALLEL_ROUNDS = 5  # sampling rounds of k-means|| (Bahmani et al. find ~5 enough with l = 2K)
_UNIFORM_BLOCK = 2**16  # global rows per generator seed in k-means|| sampling


@dataclass
class KMeansResult:
    """Outcome of the best restart.

    Attributes:
        labels: (n,) int64 on CPU, the cluster of every input row of this rank (labelled rows: their pinned cluster).
        centres: (K, D) float32 on CPU, the means of the kept partition (identical on all ranks).
        inertia: global sum of squared distances of the kept partition to the centres used to form it.
        n_iter: Lloyd iterations run by the best restart.
        best_restart: index of the best restart (its generator seed is ``seed + best_restart``).
        labelled_classes: (M,) int64 on CPU; cluster j is class ``labelled_classes[j]`` (empty for plain k-means).
        restart_inertia: best inertia of every restart, in order.
    """

    labels: torch.Tensor
    centres: torch.Tensor
    inertia: float
    n_iter: int
    best_restart: int
    labelled_classes: torch.Tensor
    restart_inertia: list[float] = field(default_factory=list)


@dataclass
class _Shard:
    """This rank's place among the unlabelled points of all ranks."""

    rank: int
    world: int
    counts: list[int]  # unlabelled points held by each rank
    offset: int  # global index of this rank's first unlabelled point

    @property
    def total(self) -> int:
        return sum(self.counts)

    def owner_of(self, global_index: int) -> tuple[int, int]:
        """Rank holding ``global_index`` and the index within that rank's shard."""
        ends = list(accumulate(self.counts))
        owner = bisect_right(ends, global_index)
        return owner, global_index - (ends[owner] - self.counts[owner])

    def draw_uniform(self, gen: torch.Generator) -> tuple[int, int]:
        """``owner_of`` a point drawn uniformly over all ranks' points."""
        return self.owner_of(int(torch.randint(self.total, (1,), generator=gen)))


@dataclass
class _LabelledStats:
    """Global per-class statistics of the pinned labelled points (float64)."""

    classes: torch.Tensor  # (M,) int64 sorted class ids
    sums: torch.Tensor  # (M, D) sum of features
    counts: torch.Tensor  # (M,) int64
    sq_norms: torch.Tensor  # (M,) sum of squared feature norms

    @property
    def num(self) -> int:
        return int(self.classes.numel())

    def means(self) -> torch.Tensor:
        return (self.sums / self.counts[:, None]).float()

    def inertia(self, centres: torch.Tensor) -> float:
        """Sum over labelled points of ||x - C_class(x)||^2, from the class statistics (exact in float64)."""
        if self.num == 0:
            return 0.0
        c = centres[: self.num].double()
        per_class = self.sq_norms - 2.0 * (c * self.sums).sum(1) + self.counts * (c * c).sum(1)
        return float(per_class.sum().clamp_min(0.0))


def contiguous_shard(n: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """Rows of a length-``n`` set that this rank clusters: contiguous, nearly equal blocks in rank order.

    Contiguous blocks keep the rank-major concatenation equal to the original order, which makes a distributed run
    reproduce the single-process one.

    Args:
        n: number of rows.
        rank: this rank (default: the process group's).
        world_size: number of ranks (default: the process group's).

    Returns:
        ``slice(start, stop)`` of this rank's rows.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


@contextmanager
def _exact_float32() -> Iterator[None]:
    """Full float32 matmuls (no TF32 / reduced-precision oneDNN) while clustering; previous settings restored."""
    cuda_prev = torch.backends.cuda.matmul.fp32_precision
    mkldnn_prev = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = cuda_prev
        torch.backends.mkldnn.matmul.fp32_precision = mkldnn_prev


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic ``index_add_`` / ``cumsum`` on CUDA (atomics otherwise); a no-op on CPU."""
    if device.type != "cuda":
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _resolve_device(x: torch.Tensor, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if x.device.type == "cuda":
        return x.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _rows_per_chunk(k: int, chunk_bytes: int) -> int:
    """Rows whose (rows, k) float32 distance block fits in ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(k, 1)))


def _nearest(
    x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, chunk_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centre for every row of ``x``.

    Args:
        x: (n, D) float32 points; x_sq: (n,) their squared norms.
        centres: (K, D) float32.
        chunk_bytes: memory budget of one (rows, K) distance block.

    Returns:
        ``(min_dist (n,) float32 clamped at 0, labels (n,) int64)``.
    """
    n, k = x.shape[0], centres.shape[0]
    c_sq = (centres * centres).sum(1)
    c_t = centres.t()
    min_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    rows = _rows_per_chunk(k, chunk_bytes)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        # ||c||^2 - 2 x.c in one GEMM; the row constant ||x||^2 does not change the argmin and is added to the minimum
        val, idx = torch.addmm(c_sq, x[start:stop], c_t, alpha=-2.0).min(dim=1)
        min_dist[start:stop] = (val + x_sq[start:stop]).clamp_min_(0.0)
        labels[start:stop] = idx
    return min_dist, labels


def _per_rank(value: float | int, device: torch.device, dtype: torch.dtype) -> list:
    """All ranks' values of a scalar, in rank order (one all-reduce of a one-hot vector)."""
    buf = torch.zeros(get_world_size(), dtype=dtype, device=device)
    buf[get_rank()] = value
    return all_reduce_sum(buf).tolist()


def _pick_by_threshold(min_dist: torch.Tensor, threshold: float) -> int:
    """First local index whose running sum of ``min_dist`` exceeds ``threshold`` (a point with d > 0)."""
    cum = min_dist.double().cumsum(0)
    idx = int(torch.searchsorted(cum, torch.tensor([threshold], dtype=torch.float64, device=cum.device), right=True))
    if idx >= min_dist.numel():  # threshold rounded past the local total: the last point with d > 0
        idx = int(torch.nonzero(min_dist > 0).max())
    return idx


def _broadcast_row(xu: torch.Tensor, owner: int, local: int, shard: _Shard) -> torch.Tensor:
    """Row ``local`` of rank ``owner``'s ``xu``, on every rank."""
    point = torch.zeros(xu.shape[1], dtype=torch.float32, device=xu.device)
    if owner == shard.rank:
        point.copy_(xu[local])
    return broadcast(point, src=owner)


def _kmeanspp(
    xu: torch.Tensor,
    xu_sq: torch.Tensor,
    fixed: torch.Tensor,
    k: int,
    gen: torch.Generator,
    shard: _Shard,
    chunk_bytes: int,
) -> torch.Tensor:
    """k-means++ D^2 seeding of ``k - len(fixed)`` centres from the (sharded) unlabelled points.

    Args:
        xu: (n_u, D) this rank's unlabelled points; xu_sq: their squared norms.
        fixed: (M, D) centres already placed (labelled class means); may be empty.
        k: total number of centres.
        gen: CPU generator, in the same state on every rank.
        shard: this rank's place in the global order.
        chunk_bytes: distance block budget.

    Returns:
        (k, D) float32 centres, identical on all ranks.
    """
    device, dim = xu.device, xu.shape[1]
    centres = torch.empty(k, dim, dtype=torch.float32, device=device)
    centres[: fixed.shape[0]] = fixed
    if fixed.shape[0] > 0:
        min_dist = _nearest(xu, xu_sq, fixed, chunk_bytes)[0]
    else:
        min_dist = torch.full((xu.shape[0],), math.inf, dtype=torch.float32, device=device)
    chosen = torch.zeros(xu.shape[0], dtype=torch.bool, device=device)
    for j in range(fixed.shape[0], k):
        if j == 0:  # no centre yet: uniform over all points
            owner, local = shard.draw_uniform(gen)
        else:
            totals = _per_rank(float(min_dist.sum(dtype=torch.float64)), device, torch.float64)
            grand = sum(totals)
            if grand > 0:
                threshold = float(torch.rand(1, generator=gen, dtype=torch.float64)) * grand
                ends = list(accumulate(totals))
                owner = min(bisect_right(ends, threshold), shard.world - 1)
                while totals[owner] <= 0:  # threshold rounded onto a boundary: step back to a rank with mass
                    owner -= 1
                local = -1
                if owner == shard.rank:
                    with _deterministic(device):
                        local = _pick_by_threshold(min_dist, max(0.0, threshold - (ends[owner] - totals[owner])))
            else:  # every point sits on a centre: uniform among the points not chosen yet
                free = _per_rank(int((~chosen).sum()), device, torch.int64)
                t = int(torch.randint(sum(free), (1,), generator=gen))
                ends = list(accumulate(free))
                owner = bisect_right(ends, t)
                local = -1
                if owner == shard.rank:
                    local = int(torch.nonzero(~chosen)[t - (ends[owner] - free[owner])])
        point = _broadcast_row(xu, owner, local, shard)
        if owner == shard.rank:
            chosen[local] = True
        centres[j] = point
        new_dist = (xu_sq + (point * point).sum() - 2.0 * (xu @ point)).clamp_min_(0.0)
        torch.minimum(min_dist, new_dist, out=min_dist)
        if owner == shard.rank:
            min_dist[local] = 0.0
    return centres


def _global_uniforms(seed: int, shard: _Shard, n_local: int, device: torch.device) -> torch.Tensor:
    """float64 uniforms for this rank's rows, each a function of ``seed`` and its global index only.

    Global rows are cut into blocks of ``_UNIFORM_BLOCK``; block b is drawn from a generator seeded ``seed + b``,
    so every sharding of the rows sees the same numbers at a cost proportional to its own rows.
    """
    start, stop = shard.offset, shard.offset + n_local
    parts = [torch.zeros(0, dtype=torch.float64)]
    for block in range(start // _UNIFORM_BLOCK, -(-stop // _UNIFORM_BLOCK)):
        base = block * _UNIFORM_BLOCK
        u = torch.rand(_UNIFORM_BLOCK, generator=torch.Generator().manual_seed(seed + block), dtype=torch.float64)
        parts.append(u[max(start - base, 0) : stop - base])
    return torch.cat(parts).to(device)


def _weighted_kmeanspp(
    cand: torch.Tensor, weights: torch.Tensor, fixed: torch.Tensor, need: int, gen: torch.Generator, chunk_bytes: int
) -> torch.Tensor:
    """Up to ``need`` rows of ``cand`` by D^2 sampling weighted by ``weights``, with ``fixed`` already placed.

    Stops early when every remaining candidate of positive weight sits on a chosen centre. Identical on all ranks
    given identical inputs and generator state.

    Returns:
        (<= need, D) the chosen candidates, in order.
    """
    cand_sq = (cand * cand).sum(1)
    if fixed.shape[0] > 0:
        dist = _nearest(cand, cand_sq, fixed, chunk_bytes)[0].double()
    else:  # no centre yet: the first pick is proportional to the weight alone
        dist = torch.full((cand.shape[0],), math.inf, dtype=torch.float64, device=cand.device)
    picked: list[int] = []
    for _ in range(need):
        score = torch.where(torch.isinf(dist), weights, weights * dist)
        total = float(score.sum())
        if total <= 0:
            break
        threshold = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
        with _deterministic(cand.device):
            idx = _pick_by_threshold(score, threshold)
        picked.append(idx)
        torch.minimum(dist, _nearest(cand, cand_sq, cand[idx : idx + 1], chunk_bytes)[0].double(), out=dist)
        dist[idx] = 0.0
    return cand[picked]


def _kmeans_parallel(
    xu: torch.Tensor,
    xu_sq: torch.Tensor,
    fixed: torch.Tensor,
    k: int,
    gen: torch.Generator,
    shard: _Shard,
    chunk_bytes: int,
) -> torch.Tensor:
    """k-means|| seeding (Bahmani et al., VLDB 2012) of ``k - len(fixed)`` centres from the (sharded) points.

    Starting from ``fixed`` (or one uniform point when there is none), ``KMEANS_PARALLEL_ROUNDS`` rounds keep every
    point independently with probability min(1, l d(x) / phi), l = 2k; the candidates are gathered in global order,
    weighted by the points nearest to them, and reduced to the missing centres by weighted k-means++. Too few
    candidates: k-means++ over the points places the rest. Arguments and result as ``_kmeanspp``.
    """
    device, n_u = xu.device, xu.shape[0]
    oversampling = 2.0 * k
    if fixed.shape[0] > 0:
        cand = [xu.new_zeros(0, xu.shape[1])]
        min_dist = _nearest(xu, xu_sq, fixed, chunk_bytes)[0]
    else:
        owner, local = shard.draw_uniform(gen)
        cand = [_broadcast_row(xu, owner, local, shard)[None]]
        min_dist = _nearest(xu, xu_sq, cand[0], chunk_bytes)[0]
        if owner == shard.rank:
            min_dist[local] = 0.0
    for _ in range(KMEANS_PARALLEL_ROUNDS):
        phi = float(all_reduce_sum(min_dist.sum(dtype=torch.float64).reshape(1)))
        if phi <= 0:
            break
        u = _global_uniforms(int(torch.randint(2**62, (1,), generator=gen)), shard, n_u, device)
        keep = u < oversampling * min_dist.double() / phi
        sampled = torch.cat(all_gather_variable(xu[keep]))
        if sampled.shape[0] == 0:
            continue
        cand.append(sampled)
        torch.minimum(min_dist, _nearest(xu, xu_sq, sampled, chunk_bytes)[0], out=min_dist)
        min_dist[keep] = 0.0
    cand = torch.cat(cand)
    nearest = _nearest(xu, xu_sq, torch.cat([fixed, cand]), chunk_bytes)[1]
    weights = all_reduce_sum(torch.bincount(nearest, minlength=fixed.shape[0] + cand.shape[0]).double())
    chosen = _weighted_kmeanspp(cand, weights[fixed.shape[0] :], fixed, k - fixed.shape[0], gen, chunk_bytes)
    centres = torch.cat([fixed, chosen])
    if centres.shape[0] < k:
        logger.info(
            "k-means||: the candidates gave %d of the %d missing centres; k-means++ places the other %d",
            chosen.shape[0],
            k - fixed.shape[0],
            k - centres.shape[0],
        )
        centres = _kmeanspp(xu, xu_sq, centres, k, gen, shard, chunk_bytes)
    return centres


def _reseed_empty(
    counts: torch.Tensor,
    sums: torch.Tensor,
    xu: torch.Tensor,
    labels: torch.Tensor,
    min_dist: torch.Tensor,
    shard: _Shard,
) -> float:
    """Move the unlabelled points farthest from their own centre into the empty clusters (in place).

    Global top-e by distance (ties: lowest global index); a point whose cluster would become empty is not taken.
    ``counts``/``sums`` (global, float64 sums) and this rank's ``labels``/``min_dist`` are updated.

    Returns:
        Total distance of the moved points (they now sit on their own centre), to subtract from the inertia.
    """
    device = xu.device
    removed = 0.0
    while True:
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() == 0:
            return removed
        e = empty.numel()
        score = torch.where(counts[labels] > 1, min_dist, torch.full_like(min_dist, -1.0))
        local = torch.sort(score, descending=True, stable=True).indices[:e]
        gathered_score = torch.cat(all_gather_variable(score[local].double()))
        gathered_index = torch.cat(all_gather_variable(local + shard.offset))
        gathered_x = torch.cat(all_gather_variable(xu[local]))
        gathered_label = torch.cat(all_gather_variable(labels[local]))
        by_index = torch.argsort(gathered_index, stable=True)
        order = by_index[torch.sort(gathered_score[by_index], descending=True, stable=True).indices[:e]]
        order = order[gathered_score[order] >= 0]
        if order.numel() == 0:
            raise RuntimeError(f"cannot reseed {e} empty cluster(s): every unlabelled point is alone in its cluster")
        targets = empty[: order.numel()]
        moved_x = gathered_x[order].double()
        source = gathered_label[order]
        with _deterministic(device):
            sums.index_add_(0, source, -moved_x)
            counts.index_add_(0, source, -torch.ones_like(source))
        sums[targets] = moved_x
        counts[targets] = 1
        removed += float(gathered_score[order].sum())
        mine = (gathered_index[order] >= shard.offset) & (gathered_index[order] < shard.offset + xu.shape[0])
        local_idx = gathered_index[order][mine] - shard.offset
        labels[local_idx] = targets[mine]
        min_dist[local_idx] = 0.0
        logger.debug("reseeded %d empty cluster(s)", int(order.numel()))


def _lloyd(
    xu: torch.Tensor,
    xu_sq: torch.Tensor,
    centres: torch.Tensor,
    stats: _LabelledStats,
    shard: _Shard,
    max_iter: int,
    tol: float,
    chunk_bytes: int,
    desc: str,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Lloyd iterations from ``centres``; keeps the iteration with the lowest inertia.

    Returns:
        ``(labels of this rank's unlabelled points, centres (K, D), inertia, iterations run)`` of the best iteration.
    """
    k, device = centres.shape[0], xu.device
    m = stats.num
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    bar = tqdm(total=max_iter, desc=desc, leave=False, disable=not (progress and is_primary()))
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        min_dist, labels = _nearest(xu, xu_sq, centres, chunk_bytes)
        sums = torch.zeros(k, xu.shape[1], dtype=torch.float32, device=device)
        with _deterministic(device):
            sums.index_add_(0, labels, xu)
        counts_inertia = torch.cat(
            [torch.bincount(labels, minlength=k).double(), min_dist.sum(dtype=torch.float64).reshape(1)]
        )
        all_reduce_sum(sums)
        all_reduce_sum(counts_inertia)
        counts = counts_inertia[:k].round().long()
        inertia = float(counts_inertia[k]) + stats.inertia(centres)
        sums = sums.double()
        sums[:m] += stats.sums
        counts[:m] += stats.counts
        if bool((counts == 0).any()):
            inertia -= _reseed_empty(counts, sums, xu, labels, min_dist, shard)
        new_centres = (sums / counts[:, None]).float()
        shift = float(torch.linalg.vector_norm(new_centres.double() - centres.double(), dim=1).sum())
        if best is None or inertia < best[2]:
            best = (labels, new_centres, inertia)
        centres = new_centres
        bar.update(1)
        bar.set_postfix(inertia=f"{inertia:.4f}", shift=f"{shift:.2e}")
        if shift**2 < tol:
            break
    bar.close()
    return best[0], best[1], best[2], n_iter


def _labelled_stats(
    xl: torch.Tensor, yl: torch.Tensor, num_labelled: int, device: torch.device, chunk_bytes: int
) -> _LabelledStats:
    """Sorted global labelled classes and their all-reduced float64 sums, counts and squared-norm sums."""
    dim = xl.shape[1]
    if num_labelled == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return _LabelledStats(empty, torch.zeros(0, dim, dtype=torch.float64, device=device), empty, empty.double())
    classes = torch.unique(torch.cat(all_gather_variable(torch.unique(yl))))
    m = classes.numel()
    cluster = torch.searchsorted(classes, yl)
    sums = torch.zeros(m, dim, dtype=torch.float64, device=device)
    sq_norms = torch.zeros(m, dtype=torch.float64, device=device)
    rows = max(1, chunk_bytes // (8 * max(dim, 1)))
    with _deterministic(device):
        for start in range(0, xl.shape[0], rows):
            chunk = xl[start : start + rows].double()
            sums.index_add_(0, cluster[start : start + rows], chunk)
            sq_norms.index_add_(0, cluster[start : start + rows], (chunk * chunk).sum(1))
    counts = torch.bincount(cluster, minlength=m)
    all_reduce_sum(sums)
    all_reduce_sum(sq_norms)
    all_reduce_sum(counts)
    return _LabelledStats(classes, sums, counts, sq_norms)


def _fit(
    x: torch.Tensor,
    k: int,
    class_labels: torch.Tensor | None,
    labelled_mask: torch.Tensor | None,
    n_init: int,
    max_iter: int,
    tol: float,
    seed: int,
    init_centres: torch.Tensor | None,
    init: str,
    device: str | torch.device | None,
    chunk_bytes: int,
    progress: bool,
) -> KMeansResult:
    """Shared implementation of ``kmeans`` (no labelled rows) and ``semi_supervised_kmeans``."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (n, D) tensor, got shape {tuple(x.shape)}")
    if k < 1 or n_init < 1 or max_iter < 1 or tol < 0:
        raise ValueError(f"need K >= 1, n_init >= 1, max_iter >= 1, tol >= 0; got {k}, {n_init}, {max_iter}, {tol}")
    n, dim = x.shape
    if labelled_mask is None:
        labelled_mask = torch.zeros(n, dtype=torch.bool)
    labelled_mask = torch.as_tensor(labelled_mask).cpu()
    if labelled_mask.dtype != torch.bool or labelled_mask.shape != (n,):
        raise ValueError(
            f"labelled_mask must be a bool tensor of shape ({n},), got {labelled_mask.dtype} "
            f"{tuple(labelled_mask.shape)}"
        )
    dev = _resolve_device(x, device)
    with torch.no_grad(), _exact_float32():
        # slice on the source device first, so that only the two parts are copied to the compute device
        src_mask = labelled_mask.to(x.device)
        xl = x[src_mask].to(device=dev, dtype=torch.float32)
        xu = (x[~src_mask] if bool(labelled_mask.any()) else x).to(device=dev, dtype=torch.float32).contiguous()
        mask = labelled_mask.to(dev)
        yl = torch.zeros(0, dtype=torch.int64, device=dev)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels)
            if class_labels.shape != (n,) or class_labels.is_floating_point():
                raise ValueError(
                    f"labels must be an integer tensor of shape ({n},), got {class_labels.dtype} "
                    f"{tuple(class_labels.shape)}"
                )
            yl = class_labels.to(dev, torch.int64)[mask]

        # global sizes and collective input checks, so that every rank raises the same error
        n_bad = int((~torch.isfinite(xu)).any(dim=1).sum()) + int((~torch.isfinite(xl)).any(dim=1).sum())
        sizes = torch.tensor([n, xu.shape[0], xl.shape[0], n_bad, int((yl < 0).sum())], dtype=torch.int64, device=dev)
        counts_u = _per_rank(xu.shape[0], dev, torch.int64)
        n_total, n_u, n_l, n_bad, n_negative = all_reduce_sum(sizes).tolist()
        if n_bad:
            raise ValueError(f"features contain NaN or infinite values in {n_bad} row(s); clustering needs finite data")
        if n_negative:
            raise ValueError(f"labels of labelled points must be non-negative class ids; {n_negative} are negative")
        if k > n_total:
            raise ValueError(f"K={k} exceeds the number of points ({n_total})")
        stats = _labelled_stats(xl, yl, n_l, dev, chunk_bytes)
        m = stats.num
        if k < m:
            raise ValueError(f"K={k} is smaller than the number of labelled classes M={m}; need K >= M")
        if k - m > n_u:
            raise ValueError(f"K={k} minus M={m} labelled classes needs at least {k - m} unlabelled points, got {n_u}")
        if init_centres is not None:
            init_centres = torch.as_tensor(init_centres).to(dev, torch.float32)
            if init_centres.shape != (k, dim) or not bool(torch.isfinite(init_centres).all()):
                raise ValueError(
                    f"init_centres must be finite with shape ({k}, {dim}), got {tuple(init_centres.shape)}"
                )

        shard = _Shard(get_rank(), get_world_size(), counts_u, sum(counts_u[: get_rank()]))
        xu_sq = (xu * xu).sum(1)
        runs = 1 if init_centres is not None else n_init
        if init_centres is not None and n_init > 1:
            logger.info("initial centres given: one Lloyd run instead of %d %s restarts", n_init, init)
        best: tuple[torch.Tensor, torch.Tensor, float, int, int] | None = None
        restart_inertia = []
        for r in range(runs):
            if init_centres is not None:
                centres = init_centres
            else:
                gen = torch.Generator().manual_seed(seed + r)
                seeding = _kmeanspp if init == "k-means++" else _kmeans_parallel
                centres = seeding(xu, xu_sq, stats.means(), k, gen, shard, chunk_bytes)
            labels_u, centres, inertia, n_iter = _lloyd(
                xu, xu_sq, centres, stats, shard, max_iter, tol, chunk_bytes, f"k-means {r + 1}/{runs}", progress
            )
            logger.debug("k-means restart %d: inertia %.6f after %d iterations", r, inertia, n_iter)
            restart_inertia.append(inertia)
            if best is None or inertia < best[2]:
                best = (labels_u, centres, inertia, n_iter, r)

        labels_u, centres, inertia, n_iter, best_restart = best
        labels = torch.empty(n, dtype=torch.int64, device=dev)
        if m > 0:
            labels[mask] = torch.searchsorted(stats.classes, yl)
        labels[~mask] = labels_u
    logger.info(
        "k-means (K=%d, M=%d, %d points): inertia %.6f, %d iterations, best of %d restart(s)",
        k,
        m,
        n_total,
        inertia,
        n_iter,
        runs,
    )
    return KMeansResult(
        labels=labels.cpu(),
        centres=centres.cpu(),
        inertia=inertia,
        n_iter=n_iter,
        best_restart=best_restart,
        labelled_classes=stats.classes.cpu(),
        restart_inertia=restart_inertia,
    )


def semi_supervised_kmeans(
    x: torch.Tensor,
    k: int,
    class_labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    *,
    init_centres: torch.Tensor | None = None,
    init: str = "k-means++",
    device: str | torch.device | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
) -> KMeansResult:
    """GCD semi-supervised k-means (docs/method.md, section 11.1): labelled points pinned to their class's cluster.

    In a process group every rank passes its own shard of the rows; all ranks get the same centres.

    Args:
        x: (n, D) features of this rank (any float dtype / device; clustered in float32 on ``device``).
        k: number of clusters K (>= number M of labelled classes).
        class_labels: (n,) int class ids; only the labelled rows are read.
        labelled_mask: (n,) bool, True for labelled rows.
        n_init: k-means++ restarts (restart r uses seed + r); the lowest inertia wins.
        max_iter: Lloyd iteration cap per restart.
        tol: stop when (sum_k ||C'_k - C_k||_2)^2 < tol.
        seed: base seed.
        init_centres: (K, D) centres to start one Lloyd run from instead of k-means++ restarts.
        init: seeding of each restart, ``"k-means++"`` (GCD's) or ``"k-means||"`` (Bahmani et al., fewer passes).
        device: compute device (default: CUDA when available, else the device of ``x``).
        chunk_bytes: memory budget of one (rows, K) float32 distance block.
        progress: tqdm bar over iterations on rank 0.

    Returns:
        ``KMeansResult``; cluster j < M is labelled class ``labelled_classes[j]``.
    """
    return _fit(
        x,
        k,
        class_labels,
        labelled_mask,
        n_init,
        max_iter,
        tol,
        seed,
        init_centres,
        init,
        device,
        chunk_bytes,
        progress,
    )


def kmeans(
    x: torch.Tensor,
    k: int,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    *,
    init_centres: torch.Tensor | None = None,
    init: str = "k-means++",
    device: str | torch.device | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
) -> KMeansResult:
    """Plain k-means (k-means++ with a uniform first centre, D^2 sampling over all points, Lloyd iterations).

    In a process group every rank passes its own shard of the rows (e.g. its evaluation shard); all ranks get the
    same centres and their own rows' labels.

    Args:
        x: (n, D) features of this rank.
        k: number of clusters.
        n_init: restarts (restart r uses seed + r); the lowest inertia wins.
        max_iter: Lloyd iteration cap per restart.
        tol: stop when (sum_k ||C'_k - C_k||_2)^2 < tol.
        seed: base seed.
        init_centres: (K, D) centres to start one Lloyd run from instead of k-means++ restarts.
        init: seeding of each restart, ``"k-means++"`` (GCD's) or ``"k-means||"`` (Bahmani et al., fewer passes).
        device: compute device (default: CUDA when available, else the device of ``x``).
        chunk_bytes: memory budget of one (rows, K) float32 distance block.
        progress: tqdm bar over iterations on rank 0.

    Returns:
        ``KMeansResult`` (``labelled_classes`` is empty).
    """
    return _fit(x, k, None, None, n_init, max_iter, tol, seed, init_centres, init, device, chunk_bytes, progress)


def assign_to_centres(
    x: torch.Tensor,
    centres: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean) for every row.

    Args:
        x: (n, D) features.
        centres: (K, D) centres.
        device: compute device (default: CUDA when available, else the device of ``x``).
        chunk_bytes: memory budget of one (rows, K) float32 distance block.

    Returns:
        (n,) int64 cluster indices on CPU.
    """
    if x.ndim != 2 or centres.ndim != 2 or x.shape[1] != centres.shape[1]:
        raise ValueError(
            f"need x (n, D) and centres (K, D) with the same D, got {tuple(x.shape)} and {tuple(centres.shape)}"
        )
    dev = _resolve_device(x, device)
    with torch.no_grad(), _exact_float32():
        x = x.to(device=dev, dtype=torch.float32)
        return _nearest(x, (x * x).sum(1), centres.to(dev, torch.float32), chunk_bytes)[1].cpu()
