"""Semi-supervised and plain k-means in PyTorch, on one device or sharded over ranks (docs/method.md, section 11).

``semi_supervised_kmeans`` is GCD's ``fit_mix``: labelled class means are the first M centres, labelled points stay
pinned to their class's cluster, the other K - M centres come from k-means++ D^2 sampling over the unlabelled points,
and Lloyd iterations assign each unlabelled point to the nearest of all K centres. ``kmeans`` is the same loop without
labelled points (uniform first centre, D^2 sampling over all points). Fixes and efficiency over the reference:

- empty clusters are reseeded at the unlabelled points farthest from their own centre (no NaN centres);
- restart r draws from a ``torch.Generator`` seeded with ``seed + r``, identical on every rank;
- distances are ||x||^2 + ||c||^2 - 2 x.c^T with one GEMM per row block into one reused (rows, K) buffer; on CPU the
  block is sized to stay in cache, ``chunk_bytes`` caps it everywhere;
- Lloyd iterations are exact but skip the search of points that provably keep their centre (Hamerly's bounds, with
  the float32 rounding error on both sides), so that after the first few iterations most points cost one dot product
  with their own centre instead of K; centre sums use ``index_add_`` and counts ``bincount``;
- k-means++ keeps an incremental min-distance vector updated from one matrix-vector product per new centre (on CPU
  cut into row blocks that run concurrently, bitwise equal to one product), with one host read of the per-rank
  totals per step on non-owning ranks; its draws are those of GCD's algorithm for the same generator;
- distributed: every rank passes its shard of the rows; sums, counts and inertia are all-reduced each iteration, and
  k-means++ finds the rank owning the sampled threshold, which broadcasts the chosen point.

``init="k-means||"`` replaces the k - M sequential D^2 draws with a few oversampling rounds (Bahmani et al., "Scalable
K-Means++", VLDB 2012): each point is kept with probability min(1, 2K d(x) / phi) from uniforms indexed by its global
position, the kept points of all ranks become weighted candidates, and weighted k-means++ on them gives the centres.
Each candidate's weight (points nearest to it) is tracked during the rounds, so no pass over all candidates follows.

The global order of the points (used by k-means++ and by tie-breaking) is the rank-major concatenation of the shards,
so a run on contiguous shards (``utils.distributed.contiguous_shard``) reproduces the single-process run up to float
summation order.

References: GCD (Vaze et al., CVPR 2022) ``methods/clustering/faster_mix_k_means_pytorch.py``; scikit-learn
``sklearn/cluster/_kmeans.py`` (k-means++ and empty-cluster relocation); Bahmani et al., VLDB 2012 (k-means||);
Hamerly, "Making k-means even faster", SDM 2010 (bounds). Measured speed and scale-out: docs/clustering.md.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
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
# CPU distance blocks: (rows, K) float32 of about this size stay in cache between the GEMM and the min pass; at least
# _CPU_MIN_ROWS rows, so that the (D, K) centres read per block stay small next to the block's GEMM work
_CPU_BLOCK_BYTES = 16 * 2**20
_CPU_MIN_ROWS = 256
# matrix-vector products over at least this many elements are cut into row blocks run on several CPU threads; block
# starts are multiples of _MATVEC_ALIGN rows, which keeps every row's dot product bitwise that of a single call
_MATVEC_MIN_ELEMENTS = 2**20
_MATVEC_ALIGN = 64


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
        seconds: wall-clock seconds summed over restarts, ``{"init": seeding, "lloyd": Lloyd iterations}``.
    """

    labels: torch.Tensor
    centres: torch.Tensor
    inertia: float
    n_iter: int
    best_restart: int
    labelled_classes: torch.Tensor
    restart_inertia: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


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


def _seconds_since(start: float, device: torch.device) -> float:
    """Wall-clock seconds since ``start`` (``time.perf_counter``), after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _resolve_device(x: torch.Tensor, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if x.device.type == "cuda":
        return x.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _rows_per_chunk(k: int, chunk_bytes: int, device: torch.device | None = None) -> int:
    """Rows whose (rows, k) float32 distance block fits in ``chunk_bytes``; on a CPU ``device`` also cache-sized.

    On CPU, a block of about ``_CPU_BLOCK_BYTES`` (and at least ``_CPU_MIN_ROWS`` rows) is still in cache when the min
    pass reads it; ``chunk_bytes`` stays the cap. Without ``device`` only the budget counts.
    """
    rows = chunk_bytes // (4 * max(k, 1))
    if device is not None and device.type == "cpu":
        rows = min(rows, max(_CPU_MIN_ROWS, _CPU_BLOCK_BYTES // (4 * max(k, 1))))
    return max(1, rows)


def _row_sq_norms(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``(x * x).sum(1)`` in blocks of ``rows`` rows (bitwise the same per row), without an (n, D) temporary."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        torch.sum(block * block, dim=1, out=out[start : start + rows])
    return out


def _nonfinite_rows(x: torch.Tensor, rows: int) -> int:
    """Number of rows of ``x`` with a NaN or infinite entry, in blocks of ``rows`` rows."""
    bad = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], rows):
        bad += (~torch.isfinite(x[start : start + rows])).any(dim=1).sum()
    return int(bad)


def _nearest(
    x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centre for every row of ``x``.

    Args:
        x: (n, D) float32 points; x_sq: (n,) their squared norms.
        centres: (K, D) float32.
        rows: rows per (rows, K) distance block (``_rows_per_chunk``); one block buffer is reused.

    Returns:
        ``(min_dist (n,) float32 clamped at 0, labels (n,) int64)``.
    """
    n, k = x.shape[0], centres.shape[0]
    c_sq = (centres * centres).sum(1)
    c_t = centres.t()
    min_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    block = torch.empty(min(rows, n), k, dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        dist = block[: stop - start]
        # ||c||^2 - 2 x.c in one GEMM; the row constant ||x||^2 does not change the argmin and is added to the minimum
        torch.addmm(c_sq, x[start:stop], c_t, alpha=-2.0, out=dist)
        torch.min(dist, dim=1, out=(min_dist[start:stop], labels[start:stop]))
    min_dist.add_(x_sq).clamp_min_(0.0)
    return min_dist, labels


class _MatVec:
    """``x @ v`` for a fixed (n, D) ``x`` into a caller's buffer.

    A BLAS matrix-vector product runs on one core; on CPU, products over at least ``_MATVEC_MIN_ELEMENTS`` elements
    are cut into one row block per ``torch.get_num_threads()`` thread and run concurrently (PyTorch releases the GIL).
    Block starts are multiples of ``_MATVEC_ALIGN`` rows, so that every row meets the same BLAS kernel as in one call
    over all rows: the result is bitwise that of ``x @ v`` (tests/utils/test_kmeans.py checks it).
    """

    def __init__(self, x: torch.Tensor, pool: ThreadPoolExecutor | None) -> None:
        self.x, self.pool = x, pool
        n = x.shape[0]
        parts = torch.get_num_threads() if pool is not None and x.device.type == "cpu" else 1
        if x.numel() < _MATVEC_MIN_ELEMENTS:
            parts = 1
        cuts = sorted({n * i // parts // _MATVEC_ALIGN * _MATVEC_ALIGN for i in range(parts)} | {n})
        self.blocks = list(zip(cuts[:-1], cuts[1:]))

    def __call__(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) <= 1:
            return torch.mv(self.x, v, out=out)
        jobs = [self.pool.submit(torch.mv, self.x[a:b], v, out=out[a:b]) for a, b in self.blocks]
        for job in jobs:
            job.result()
        return out


@contextmanager
def _matvec_pool(device: torch.device) -> Iterator[ThreadPoolExecutor | None]:
    """Threads for ``_MatVec`` on a multi-threaded CPU, else ``None``."""
    if device.type != "cpu" or torch.get_num_threads() < 2:
        yield None
        return
    with ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="kmeans-mv") as pool:
        yield pool


def _sq_dist_to_point(
    x_sq: torch.Tensor, point: torch.Tensor, matvec: _MatVec, out: torch.Tensor, dot: torch.Tensor
) -> torch.Tensor:
    """``out = max(0, (||x||^2 + ||p||^2) - 2 x.p)`` for every row of ``matvec.x``, using the buffer ``dot``.

    The same float32 operations, in the same order, as ``(x_sq + (p * p).sum() - 2.0 * (x @ p)).clamp_min(0)``
    (2 x.p is exact), so k-means++ draws stay bitwise those of that expression.
    """
    matvec(point, out=dot)
    torch.add(x_sq, (point * point).sum(), out=out)
    return out.sub_(dot, alpha=2.0).clamp_min_(0.0)


def _per_rank(value: float | int | torch.Tensor, device: torch.device, dtype: torch.dtype) -> list:
    """All ranks' values of a scalar (a number or a 0-d tensor), in rank order (one all-reduce of a one-hot vector)."""
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
    device, (n_u, dim) = xu.device, xu.shape
    centres = torch.empty(k, dim, dtype=torch.float32, device=device)
    centres[: fixed.shape[0]] = fixed
    if fixed.shape[0] > 0:
        # budget-only blocks: the draws depend on these distances, which must not change with CPU cache tuning
        min_dist = _nearest(xu, xu_sq, fixed, _rows_per_chunk(fixed.shape[0], chunk_bytes))[0]
    else:
        min_dist = torch.full((n_u,), math.inf, dtype=torch.float32, device=device)
    chosen = torch.zeros(n_u, dtype=torch.bool, device=device)
    new_dist, dot = torch.empty_like(min_dist), torch.empty_like(min_dist)
    with _matvec_pool(device) as pool:
        matvec = _MatVec(xu, pool)
        for j in range(fixed.shape[0], k):
            if j == 0:  # no centre yet: uniform over all points
                owner, local = shard.draw_uniform(gen)
            else:
                owner, local = _draw_d2(min_dist, chosen, gen, shard)
            point = _broadcast_row(xu, owner, local, shard)
            if owner == shard.rank:
                chosen[local] = True
            centres[j] = point
            torch.minimum(min_dist, _sq_dist_to_point(xu_sq, point, matvec, new_dist, dot), out=min_dist)
            if owner == shard.rank:
                min_dist[local] = 0.0
    return centres


def _draw_d2(min_dist: torch.Tensor, chosen: torch.Tensor, gen: torch.Generator, shard: _Shard) -> tuple[int, int]:
    """One k-means++ draw over all ranks: ``(owner rank, index in the owner's shard)`` (``-1`` on other ranks).

    A point is drawn with probability ``min_dist / sum(min_dist)``, or uniformly among the points not chosen yet when
    every distance is 0. The per-rank totals are the one host read of every rank; the owner reads its index.
    """
    device = min_dist.device
    totals = _per_rank(min_dist.sum(dtype=torch.float64), device, torch.float64)
    grand = sum(totals)
    local = -1
    if grand > 0:
        threshold = float(torch.rand(1, generator=gen, dtype=torch.float64)) * grand
        ends = list(accumulate(totals))
        owner = min(bisect_right(ends, threshold), shard.world - 1)
        while totals[owner] <= 0:  # threshold rounded onto a boundary: step back to a rank with mass
            owner -= 1
        if owner == shard.rank:
            with _deterministic(device):
                local = _pick_by_threshold(min_dist, max(0.0, threshold - (ends[owner] - totals[owner])))
    else:  # every point sits on a centre: uniform among the points not chosen yet
        free = _per_rank(int((~chosen).sum()), device, torch.int64)
        t = int(torch.randint(sum(free), (1,), generator=gen))
        ends = list(accumulate(free))
        owner = bisect_right(ends, t)
        if owner == shard.rank:
            local = int(torch.nonzero(~chosen)[t - (ends[owner] - free[owner])])
    return owner, local


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
    device = cand.device
    cand_sq = (cand * cand).sum(1)
    if fixed.shape[0] > 0:
        dist = _nearest(cand, cand_sq, fixed, _rows_per_chunk(fixed.shape[0], chunk_bytes, device))[0].double()
    else:  # no centre yet: the first pick is proportional to the weight alone
        dist = torch.full((cand.shape[0],), math.inf, dtype=torch.float64, device=device)
    new_dist, dot = torch.empty_like(cand_sq), torch.empty_like(cand_sq)
    picked: list[int] = []
    with _matvec_pool(device) as pool:
        matvec = _MatVec(cand, pool)
        for _ in range(need):
            score = torch.where(torch.isinf(dist), weights, weights * dist)
            total = float(score.sum())
            if total <= 0:
                break
            threshold = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
            with _deterministic(device):
                idx = _pick_by_threshold(score, threshold)
            picked.append(idx)
            torch.minimum(dist, _sq_dist_to_point(cand_sq, cand[idx], matvec, new_dist, dot).double(), out=dist)
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
    point independently with probability min(1, l d(x) / phi), l = 2k; the candidates are gathered in global order
    and weighted by the points nearest to them (tracked round by round: a kept point is nearest to itself, another
    point moves to a new candidate that is strictly closer), then reduced to the missing centres by weighted
    k-means++. Too few candidates: k-means++ over the points places the rest. Arguments and result as ``_kmeanspp``.
    """
    device, (n_u, dim) = xu.device, xu.shape
    m = fixed.shape[0]
    oversampling = 2.0 * k
    if m > 0:
        cand = [xu.new_zeros(0, dim)]
        min_dist, nearest = _nearest(xu, xu_sq, fixed, _rows_per_chunk(m, chunk_bytes, device))
    else:
        owner, local = shard.draw_uniform(gen)
        cand = [_broadcast_row(xu, owner, local, shard)[None]]
        with _matvec_pool(device) as pool:
            min_dist = torch.empty_like(xu_sq)
            _sq_dist_to_point(xu_sq, cand[0][0], _MatVec(xu, pool), min_dist, torch.empty_like(xu_sq))
        nearest = torch.zeros(n_u, dtype=torch.int64, device=device)
        if owner == shard.rank:
            min_dist[local] = 0.0
    n_cand = m + cand[0].shape[0]  # index of the next candidate in [fixed, candidates]
    for _ in range(KMEANS_PARALLEL_ROUNDS):
        phi = float(all_reduce_sum(min_dist.sum(dtype=torch.float64).reshape(1)))
        if phi <= 0:
            break
        u = _global_uniforms(int(torch.randint(2**62, (1,), generator=gen)), shard, n_u, device)
        keep = u < oversampling * min_dist.double() / phi
        parts = all_gather_variable(xu[keep])
        sampled = torch.cat(parts)
        if sampled.shape[0] == 0:
            continue
        cand.append(sampled)
        dist, idx = _nearest(xu, xu_sq, sampled, _rows_per_chunk(sampled.shape[0], chunk_bytes, device))
        nearest = torch.where(dist < min_dist, idx + n_cand, nearest)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[keep] = 0.0
        first = n_cand + sum(part.shape[0] for part in parts[: shard.rank])
        nearest[keep] = torch.arange(first, first + parts[shard.rank].shape[0], device=device)
        n_cand += sampled.shape[0]
    cand = torch.cat(cand)
    weights = all_reduce_sum(torch.bincount(nearest, minlength=n_cand).double())
    chosen = _weighted_kmeanspp(cand, weights[m:], fixed, k - m, gen, chunk_bytes)
    centres = torch.cat([fixed, chosen])
    if centres.shape[0] < k:
        logger.info(
            "k-means||: the candidates gave %d of the %d missing centres; k-means++ places the other %d",
            chosen.shape[0],
            k - m,
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


def _sq_dist_error(dim: int) -> float:
    """Bound on the float32 error of ``||x||^2 + ||c||^2 - 2 x.c``, as a multiple of ``||x||^2 + ||c||^2``.

    Each norm and the dot product is a length-``dim`` sum with error <= gamma = dim u / (1 - dim u) times the sum of
    absolute terms (u = 2^-24, |x.c| <= (||x||^2 + ||c||^2) / 2), and two roundings combine them: 2 gamma + 4 u in
    all (Higham, "Accuracy and Stability of Numerical Algorithms", section 3.1); doubled for safety.
    """
    u = 2.0**-24
    gamma = dim * u / (1.0 - dim * u)
    return 2.0 * (2.0 * gamma + 4.0 * u)


def _half_gaps(centres: torch.Tensor, c_sq: torch.Tensor, rows: int, rel_err: float) -> torch.Tensor:
    """float64 lower bounds of half the distance from every centre to its nearest other centre (inf when K = 1)."""
    k = centres.shape[0]
    gaps = torch.full((k,), math.inf, dtype=torch.float64, device=centres.device)
    if k < 2:
        return gaps
    nearest = torch.empty(k, dtype=torch.float32, device=centres.device)
    block = torch.empty(min(rows, k), k, dtype=torch.float32, device=centres.device)
    for start in range(0, k, rows):
        stop = min(start + rows, k)
        dist = block[: stop - start]
        torch.addmm(c_sq, centres[start:stop], centres.t(), alpha=-2.0, out=dist)
        dist.diagonal(offset=start).fill_(math.inf)  # a centre is not its own neighbour
        torch.amin(dist, dim=1, out=nearest[start:stop])
    sq = nearest.double() + c_sq.double() - rel_err * (c_sq.double() + float(c_sq.max()))
    return 0.5 * sq.clamp_min(0.0).sqrt()


def _dist_to_own(
    x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, c_sq: torch.Tensor, labels: torch.Tensor, rows: int
) -> torch.Tensor:
    """Squared distance of every row of ``x`` to its own centre ``centres[labels]``, in row blocks, clamped at 0."""
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    own = torch.empty(min(rows, n), x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = own[: stop - start]
        torch.index_select(centres, 0, labels[start:stop], out=block)
        out[start:stop] = block.mul_(x[start:stop]).sum(1)
    return out.mul_(-2.0).add_(x_sq).add_(c_sq[labels]).clamp_min_(0.0)


def _search(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    centres: torch.Tensor,
    c_sq: torch.Tensor,
    rows: int,
    ids: torch.Tensor | None,
    labels: torch.Tensor,
    min_dist: torch.Tensor,
    second: torch.Tensor,
) -> None:
    """Nearest and second-nearest centre of the rows ``ids`` of ``x`` (all rows when None), written in place.

    ``labels[ids]`` gets the nearest centre, ``min_dist[ids]`` its squared distance (clamped at 0) and
    ``second[ids]`` the squared distance to the nearest other centre (inf when K = 1). Rows are gathered
    ``rows`` at a time, so memory stays within one (rows, K) block and one (rows, D) copy.
    """
    n = x.shape[0] if ids is None else ids.numel()
    block = torch.empty(min(rows, n), centres.shape[0], dtype=torch.float32, device=x.device)
    c_t = centres.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        sel = slice(start, stop) if ids is None else ids[start:stop]
        dist = block[: stop - start]
        # ||c||^2 - 2 x.c in one GEMM; the row constant ||x||^2 does not change the argmin and is added to the minimum
        torch.addmm(c_sq, x[sel] if ids is None else x.index_select(0, sel), c_t, alpha=-2.0, out=dist)
        nearest, idx = dist.min(dim=1)
        dist.scatter_(1, idx[:, None], math.inf)
        rows_sq = x_sq[sel]
        labels[sel] = idx
        min_dist[sel] = (nearest + rows_sq).clamp_min_(0.0)
        second[sel] = dist.amin(dim=1) + rows_sq


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

    Exact Lloyd with Hamerly's bounds (Hamerly, "Making k-means even faster", SDM 2010): a point keeps its centre
    without a search when its distance to it is at most the larger of a lower bound on its distance to every other
    centre (the second-nearest distance of its last search, minus the largest shift of another centre since) and
    half the distance from its centre to the nearest other centre. The distance to the own centre is recomputed
    every iteration; both sides carry the float32 error bound of ``_sq_dist_error``, so a point is searched whenever
    rounding could decide. Searched points get one GEMM against all K centres.

    Returns:
        ``(labels of this rank's unlabelled points, centres (K, D), inertia, iterations run)`` of the best iteration.
    """
    (n, dim), k, device = xu.shape, centres.shape[0], xu.device
    m = stats.num
    rows = _rows_per_chunk(k, chunk_bytes, device)
    rows_own = _rows_per_chunk(dim, chunk_bytes, device)
    rel_err = _sq_dist_error(dim)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    min_dist = torch.empty(n, dtype=torch.float32, device=device)
    second = torch.empty(n, dtype=torch.float32, device=device)
    lower = torch.zeros(n, dtype=torch.float64, device=device)  # bound on the distance to every other centre
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    bar = tqdm(total=max_iter, desc=desc, leave=False, disable=not (progress and is_primary()))
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        c_sq = (centres * centres).sum(1)
        err = rel_err * (xu_sq.double() + float(c_sq.max()))
        ids = None  # first iteration: no assignment yet, every point is searched
        if n_iter > 1:
            min_dist = _dist_to_own(xu, xu_sq, centres, c_sq, labels, rows_own)
            bound = torch.maximum(lower, _half_gaps(centres, c_sq, rows, rel_err)[labels])
            ids = torch.nonzero((min_dist.double() + err).sqrt() >= bound).flatten()
        _search(xu, xu_sq, centres, c_sq, rows, ids, labels, min_dist, second)
        searched = slice(None) if ids is None else ids
        lower[searched] = (second[searched].double() - err[searched]).clamp_min(0.0).sqrt()
        sums = torch.zeros(k, dim, dtype=torch.float32, device=device)
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
            lower.zero_()  # moved points have no bound to the other centres: search them again
        new_centres = (sums / counts[:, None]).float()
        shifts = torch.linalg.vector_norm(new_centres.double() - centres.double(), dim=1)
        shift = float(shifts.sum())
        if best is None or inertia < best[2]:
            best = (labels.clone(), new_centres, inertia)
        centres = new_centres
        # every other centre came at most its shift closer: the largest shift among the centres but one's own
        top = torch.topk(shifts, min(2, k))
        runner_up = top.values[1] if k > 1 else top.values[0]
        lower -= torch.where(labels == top.indices[0], runner_up, top.values[0])
        frac = 1.0 if ids is None else ids.numel() / max(n, 1)
        logger.debug("Lloyd iteration %d: inertia %.6f, %.1f%% of the points searched", n_iter, inertia, 100 * frac)
        bar.update(1)
        bar.set_postfix(inertia=f"{inertia:.4f}", shift=f"{shift:.2e}", searched=f"{100 * frac:.0f}%")
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
        row_block = _rows_per_chunk(dim, chunk_bytes, dev)
        n_bad = _nonfinite_rows(xu, row_block) + _nonfinite_rows(xl, row_block)
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
        xu_sq = _row_sq_norms(xu, row_block)
        runs = 1 if init_centres is not None else n_init
        if init_centres is not None and n_init > 1:
            logger.info("initial centres given: one Lloyd run instead of %d %s restarts", n_init, init)
        best: tuple[torch.Tensor, torch.Tensor, float, int, int] | None = None
        restart_inertia = []
        seconds = {"init": 0.0, "lloyd": 0.0}
        for r in range(runs):
            start = time.perf_counter()
            if init_centres is not None:
                centres = init_centres
            else:
                gen = torch.Generator().manual_seed(seed + r)
                seeding = _kmeanspp if init == "k-means++" else _kmeans_parallel
                centres = seeding(xu, xu_sq, stats.means(), k, gen, shard, chunk_bytes)
            seconds["init"] += _seconds_since(start, dev)
            start = time.perf_counter()
            labels_u, centres, inertia, n_iter = _lloyd(
                xu, xu_sq, centres, stats, shard, max_iter, tol, chunk_bytes, f"k-means {r + 1}/{runs}", progress
            )
            seconds["lloyd"] += _seconds_since(start, dev)
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
        seconds=seconds,
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
        rows = _rows_per_chunk(centres.shape[0], chunk_bytes, dev)
        x_sq = _row_sq_norms(x, _rows_per_chunk(x.shape[1], chunk_bytes, dev))
        return _nearest(x, x_sq, centres.to(dev, torch.float32), rows)[1].cpu()
