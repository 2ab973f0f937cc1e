"""k-means speed, memory and scale-out: ours (utils/kmeans.py) against faiss, scikit-learn and the bare distance GEMM.

On synthetic unit-norm features (a Gaussian mixture around K random unit directions, normalised; see
``benchmarks.ssk_vs_sklearn.make_features``), with the same K and the same number of Lloyd iterations for every
method (one restart, ``tol=0``, no subsampling), initialisation included, it times:

- ``mm``: the bare ``torch.mm`` of the (N, D) x (D, K) distance-GEMM shape, into a preallocated output
  (``mm-alloc``: a new output per call), the rate one Lloyd iteration can hope for;
- ``kmeans++`` / ``kmeans||``: our ``kmeans`` with either initialisation;
- ``ss-kmeans++``: our ``semi_supervised_kmeans`` with ``--labelled-frac`` of the points of the first K/2 classes
  labelled;
- ``faiss`` / ``faiss-kmeans++``: ``faiss.Kmeans`` with its default (random) and its k-means++ initialisation,
  ``max_points_per_centroid`` = N (no subsampling), ``nredo=1``, early stopping off;
- ``sklearn``: ``sklearn.cluster.kmeans_plusplus`` (its k-means++, with greedy local trials), then
  ``KMeans(init=those centres, n_init=1, max_iter=iters, tol=0, algorithm="lloyd")`` on float32; it still stops at
  strict convergence (labels unchanged), so its iteration count is reported.

Every method runs in a fresh subprocess, so that its peak memory is its own: on CPU the peak of the bytes glibc has
handed out (``mallinfo2``, sampled every millisecond) above those in use once the data exist, and the peak resident
set above the resident set then (``/proc/self/clear_refs`` resets the peak; the allocator keeps freed pages resident,
so this one is blurred); on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the fit.
The ``(N/4)`` rows repeat our two inits on a quarter of the points at the same D and K: the extra memory of k-means
beyond the data is the distance blocks (fixed by the chunk budget, not N) plus a few (N,) vectors.

Per method the table gives total seconds, init seconds, seconds per Lloyd iteration (the average over the fit; ours
skips the search of points that provably keep their centre, see utils/kmeans.py), iterations run, bare-mm / that
iteration, for ours also the seconds of one full iteration (every point searched, as in the first iteration of any
fit) and bare-mm / full iteration (target >= 0.85), total / faiss total (target <= 1 for ours), the extra peak
memory and the final inertia (a sanity check: methods should be close). Sizes: ``--size small`` N=50,000 D=384
K=1,000 and ``--size large`` N=200,000 D=768 K=2,000 (default: both); ``--n --d --k --iters`` override them.

``--nproc W`` instead runs our ``kmeans`` (both inits) in W gloo CPU processes via ``torch.distributed.run`` on
contiguous shards (``--threads`` split between them) and compares labels, centres and inertia with a 1-process run
(``--threads`` threads): labels exactly, centres and inertia to float32 tolerance.

faiss is a benchmark-only dependency (not in requirements.txt): ``pip install faiss-cpu``; without it the faiss
rows are skipped with a message. Results (with library versions, thread settings and the load average around each
run, since timings on a shared machine move with it) are logged, written as JSON (``--output``) and as a markdown
table (``--markdown``). On a machine shared with other busy processes, ``--omp-passive`` runs every method with
``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads then sleep instead of spinning on the cores the others need.

Usage (from the repository root):
    python -m benchmarks.kmeans_speed --threads 2 --output kmeans_speed.json --markdown kmeans_speed.md
    python -m benchmarks.kmeans_speed --size small --nproc 2 --threads 2 --output kmeans_dist.json
    python -m benchmarks.kmeans_speed --n 5000 --d 64 --k 50 --iters 5 --skip sklearn  # quick check
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.ssk_vs_sklearn import environment, make_features
from utils.distributed import (
    all_gather_variable,
    barrier,
    cleanup,
    contiguous_shard,
    get_rank,
    init_distributed,
    is_primary,
)
from utils.kmeans import kmeans, semi_supervised_kmeans

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SIZES = {"small": (50_000, 384, 1_000), "large": (200_000, 768, 2_000)}
METHODS = ("mm", "kmeans++", "kmeans||", "ss-kmeans++", "faiss", "faiss-kmeans++", "sklearn")
OURS = {"kmeans++": "k-means++", "kmeans||": "k-means||"}
MEMORY_FRACTION = 4  # the (N/4) rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="k-means speed and memory: ours, faiss, scikit-learn, bare GEMM.")
    parser.add_argument(
        "--size", choices=("small", "large", "both"), default="both", help="problem size(s) (default: both)"
    )
    parser.add_argument("--n", type=int, default=None, help="number of points N (overrides --size)")
    parser.add_argument("--d", type=int, default=None, help="feature width D (overrides --size)")
    parser.add_argument("--k", type=int, default=None, help="number of clusters K (overrides --size)")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations of every method (default: 20)")
    parser.add_argument("--mm-repeats", type=int, default=5, help="timed bare torch.mm calls (default: 5)")
    parser.add_argument("--noise", type=float, default=0.6, help="noise around the class directions (default: 0.6)")
    parser.add_argument(
        "--labelled-frac",
        type=float,
        default=0.25,
        help="labelled fraction of the first K/2 classes for ss-kmeans++ (default: 0.25)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and k-means seed (default: 0)")
    parser.add_argument("--device", default=None, help="cuda or cpu for ours and mm (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of every method (default: library defaults)"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=METHODS, help="methods left out (default: none)", metavar="METHOD"
    )
    parser.add_argument("--no-memory-scaling", action="store_true", help="skip the (N/4) memory rows of our two inits")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="run every method with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning; on a "
        "machine shared with other busy processes spinning threads take the cores the working ones need)",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="W > 1: compare W gloo CPU processes with 1 process (default: 1)"
    )
    parser.add_argument("--output", default=None, help="results JSON file (default: log only)")
    parser.add_argument("--markdown", default=None, help="results markdown table file (default: log only)")
    # internal: one method in this process (--worker), or one rank of the --nproc run (--dist-worker)
    parser.add_argument("--worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    # the torchrun launcher would take the rank's flags (--n, ...) for its own: they come in a JSON list file
    parser.add_argument("--dist-worker", default=None, metavar="FLAGS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-assignment", default=None, help=argparse.SUPPRESS)
    return parser


def _sizes(args: argparse.Namespace) -> dict[str, tuple[int, int, int]]:
    """Named (N, D, K) problems to run: the overrides on top of the small size, or the chosen presets."""
    if args.n is not None or args.d is not None or args.k is not None:
        n, d, k = SIZES["small"]
        return {"custom": (args.n or n, args.d or d, args.k or k)}
    names = ("small", "large") if args.size == "both" else (args.size,)
    return {name: SIZES[name] for name in names}


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------------------------------
# peak memory of this process


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class _MallocInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _malloc_in_use() -> Callable[[], int] | None:
    """glibc's bytes in use (heap chunks + mapped chunks), or None where ``mallinfo2`` is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallocInfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return in_use


class PeakMemory:
    """Peak memory of a block above the memory at its start, in MiB (see the module docstring).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the bytes glibc has handed out (``mallinfo2``), sampled every
    millisecond by a thread, which follows what is allocated whatever the allocator keeps resident; also the peak
    resident set (``extra_rss_mib``) where ``/proc/self/clear_refs`` can reset it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""
        self.extra_mib = float("nan")
        self.extra_rss_mib = float("nan")
        self._in_use = _malloc_in_use()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._in_use())
            time.sleep(1e-3)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")  # resets VmHWM, the peak resident set, to the current resident set
            self.rss_start = _proc_status_kib("VmRSS") * 1024
        except (OSError, TypeError):
            self.rss_start = None
        if self._in_use is not None:
            self.kind = "glibc mallinfo2 in-use bytes, sampled every 1 ms"
            self.start = self._peak = self._in_use()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        elif self.rss_start is not None:
            self.kind = "peak RSS (VmHWM reset)"
            self.start = self.rss_start
        else:
            self.kind = "ru_maxrss (includes data generation)"
            self.start = _rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
            return
        if self.rss_start is not None:
            self.extra_rss_mib = (_proc_status_kib("VmHWM") * 1024 - self.rss_start) / 2**20
        if self._in_use is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._in_use())
        elif self.rss_start is not None:
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra_mib = (peak - self.start) / 2**20


def _rss_bytes() -> int:
    rss = _proc_status_kib("VmRSS")
    return rss * 1024 if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------------------------
# one method, in a worker process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _run_mm(x: torch.Tensor, k: int, repeats: int, device: torch.device, alloc: bool) -> dict[str, Any]:
    """Seconds per bare (N, D) x (D, K) float32 GEMM (TF32 off): median of ``repeats`` calls after one warm-up."""
    centres_t = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:k]].t().contiguous()
    out = None if alloc else torch.empty(x.shape[0], k, dtype=torch.float32, device=device)
    prev = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        call = (lambda: torch.mm(x, centres_t)) if alloc else (lambda: torch.mm(x, centres_t, out=out))
        call()
        times = sorted(_timed(call, device)[1] for _ in range(repeats))
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev
    return {"per_call_s": times[len(times) // 2], "min_s": times[0], "calls": repeats}


def _run_ours(
    method: str, x: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor, args: argparse.Namespace
) -> tuple[dict[str, Any], Any]:
    common = dict(n_init=1, max_iter=args.iters, tol=0.0, seed=args.seed, device=_device(args), progress=False)

    def fit():
        if method == "ss-kmeans++":
            return semi_supervised_kmeans(x, args.k, labels, labelled, init="k-means++", **common)
        return kmeans(x, args.k, init=OURS[method], **common)

    res, total = _timed(fit, _device(args))
    # one more iteration from the final centres: the first Lloyd iteration of a fit searches every point
    common.update(max_iter=1, init_centres=res.centres)
    full = fit().seconds["lloyd"]
    out = {
        "total_s": total,
        "init_s": res.seconds["init"],
        "per_iter_s": res.seconds["lloyd"] / res.n_iter,
        "full_iter_s": full,
        "n_iter": res.n_iter,
        "inertia": res.inertia,
    }
    if method == "ss-kmeans++":
        out["labelled_points"] = int(labelled.sum())
        out["labelled_classes"] = int(res.labelled_classes.numel())
    return out, res


def _run_faiss(x: torch.Tensor, args: argparse.Namespace, kmeanspp: bool) -> dict[str, Any]:
    import faiss

    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    params: dict[str, Any] = dict(
        niter=args.iters,
        nredo=1,
        seed=args.seed,
        max_points_per_centroid=x.shape[0],
        min_points_per_centroid=1,
        verbose=False,
    )
    defaults = faiss.ClusteringParameters()
    if hasattr(defaults, "early_stop_threshold"):
        params["early_stop_threshold"] = -1.0  # never stop before niter
    if kmeanspp:
        if not hasattr(defaults, "init_method"):
            raise RuntimeError(f"faiss {faiss.__version__} has no k-means++ initialisation (init_method)")
        params["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    model = faiss.Kmeans(x.shape[1], args.k, **params)
    x_np = x.numpy()
    _, total = _timed(lambda: model.train(x_np), torch.device("cpu"))
    stats = model.iteration_stats  # cumulative seconds after each iteration, initialisation included
    times = [s["time"] for s in stats]
    per_iter = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0]
    return {
        "total_s": total,
        "init_s": max(0.0, times[0] - per_iter),
        "per_iter_s": per_iter,
        "n_iter": len(stats),
        "inertia": float(stats[-1]["obj"]),
        "version": faiss.__version__,
    }


def _run_sklearn(x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """scikit-learn: its k-means++ (``kmeans_plusplus``, greedy local trials as in ``KMeans``), then ``KMeans``
    Lloyd iterations from those centres; total = both."""
    from sklearn.cluster import KMeans, kmeans_plusplus
    from threadpoolctl import threadpool_limits

    x_np = x.numpy()
    with threadpool_limits(limits=args.threads):
        (centres, _), init = _timed(lambda: kmeans_plusplus(x_np, args.k, random_state=args.seed), torch.device("cpu"))
        model = KMeans(args.k, init=centres, n_init=1, max_iter=args.iters, tol=0.0, algorithm="lloyd")
        _, lloyd = _timed(lambda: model.fit(x_np), torch.device("cpu"))
    return {
        "total_s": init + lloyd,
        "init_s": init,
        "per_iter_s": lloyd / max(int(model.n_iter_), 1),
        "n_iter": int(model.n_iter_),
        "inertia": float(model.inertia_),
    }


def make_problem(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, D) float32, their classes and the labelled mask (of the first K/2 classes)."""
    x, labels = make_features(args.n, args.d, args.k, args.noise, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    labelled = (labels < args.k // 2) & (torch.rand(args.n, generator=gen) < args.labelled_frac)
    return x.contiguous(), labels, labelled


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``args.worker`` once on freshly generated data and returns its measurements."""
    device = _device(args) if args.worker in ("mm",) + tuple(OURS) + ("ss-kmeans++",) else torch.device("cpu")
    x, labels, labelled = make_problem(args)
    x = x.to(device)
    out: dict[str, Any] = {"loadavg_start": os.getloadavg()[0]}
    with PeakMemory(device) as peak:
        if args.worker == "mm":
            out.update(_run_mm(x, args.k, args.mm_repeats, device, alloc=False))
            out["alloc"] = _run_mm(x, args.k, args.mm_repeats, device, alloc=True)
        elif args.worker in ("kmeans++", "kmeans||", "ss-kmeans++"):
            result, res = _run_ours(args.worker, x, labels.to(device), labelled, args)
            out.update(result)
            if args.save_assignment:
                torch.save({"labels": res.labels, "centres": res.centres, "inertia": res.inertia}, args.save_assignment)
        elif args.worker in ("faiss", "faiss-kmeans++"):
            out.update(_run_faiss(x, args, kmeanspp=args.worker == "faiss-kmeans++"))
        else:
            out.update(_run_sklearn(x, args))
    out.update(
        peak_extra_mib=peak.extra_mib,
        peak_extra_rss_mib=peak.extra_rss_mib,
        memory_measure=peak.kind,
        data_mib=x.numel() * 4 / 2**20,
        loadavg_end=os.getloadavg()[0],
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# the driver: one subprocess per method


def _worker_env(threads: int | None, omp_passive: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    return env


def _common_flags(args: argparse.Namespace, n: int, d: int, k: int, threads: int | None) -> list[str]:
    flags = ["--n", str(n), "--d", str(d), "--k", str(k), "--iters", str(args.iters), "--seed", str(args.seed)]
    flags += ["--noise", str(args.noise), "--labelled-frac", str(args.labelled_frac)]
    flags += ["--mm-repeats", str(args.mm_repeats)]
    if threads is not None:
        flags += ["--threads", str(threads)]
    if args.device is not None:
        flags += ["--device", args.device]
    return flags


def _spawn(method: str, args: argparse.Namespace, n: int, d: int, k: int, save: str | None = None) -> dict:
    """Runs one method in a fresh interpreter and returns its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.kmeans_speed", "--worker", method, "--result", str(result)]
        cmd += _common_flags(args, n, d, k, args.threads)
        if save:
            cmd += ["--save-assignment", save]
        proc = subprocess.run(
            cmd, cwd=REPO, env=_worker_env(args.threads, args.omp_passive), capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text(encoding="utf-8"))


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def run_size(args: argparse.Namespace, name: str, n: int, d: int, k: int) -> dict[str, Any]:
    """Every method on one (N, D, K) problem, with the derived ratios."""
    methods = [m for m in METHODS if m not in args.skip]
    if not _faiss_available() and any(m.startswith("faiss") for m in methods):
        logger.warning("faiss is not installed (pip install faiss-cpu): skipping the faiss rows")
        methods = [m for m in methods if not m.startswith("faiss")]
    jobs = [(method, method, n) for method in methods]
    if not args.no_memory_scaling:
        jobs += [(f"{m} (N/{MEMORY_FRACTION})", m, n // MEMORY_FRACTION) for m in OURS if m in methods]
    rows: dict[str, dict] = {}
    for label, method, points in jobs:
        logger.info("%s (N=%d D=%d K=%d): %s ...", name, points, d, k, label)
        try:
            rows[label] = {**_spawn(method, args, points, d, k), "n": points}
        except RuntimeError as err:  # one failed method (e.g. killed) does not lose the others
            logger.error("%s: %s", label, err)
            rows[label] = {"error": str(err).splitlines()[0], "n": points}
            continue
        logger.info("%s: %s", label, json.dumps(rows[label]))
    failed = {label: row for label, row in rows.items() if "error" in row}
    rows = {label: row for label, row in rows.items() if "error" not in row}
    mm = rows.get("mm")
    if mm is not None:
        mm.update(total_s=mm["per_call_s"] * args.iters, init_s=0.0, per_iter_s=mm["per_call_s"], n_iter=args.iters)
    faiss_total = rows["faiss"]["total_s"] if "faiss" in rows else None
    for method, row in rows.items():
        if mm is not None and row.get("per_iter_s"):
            row["mm_over_iter"] = mm["per_call_s"] / row["per_iter_s"]
        if mm is not None and row.get("full_iter_s"):
            row["mm_over_full_iter"] = mm["per_call_s"] / row["full_iter_s"]
        if faiss_total:
            row["total_over_faiss"] = row["total_s"] / faiss_total
    return {"n": n, "d": d, "k": k, "iters": args.iters, "methods": rows, "failed": failed}


# ----------------------------------------------------------------------------------------------------------------
# --nproc: W processes against 1


def run_dist_worker(args: argparse.Namespace) -> None:
    """One rank of the W-process run: both inits on this rank's contiguous shard; rank 0 saves the gathered result."""
    device = init_distributed(args.device or "cpu")
    x, _, _ = make_problem(args)
    shard = contiguous_shard(x.shape[0])
    x = x[shard].contiguous().to(device)
    results = {}
    common = dict(n_init=1, max_iter=args.iters, tol=0.0, seed=args.seed, device=device, progress=False)
    for method, init in OURS.items():
        barrier()
        res, wall = _timed(lambda: kmeans(x, args.k, init=init, **common), device)
        results[method] = {
            "labels": torch.cat(all_gather_variable(res.labels.to(device))).cpu(),
            "centres": res.centres,
            "inertia": res.inertia,
            "n_iter": res.n_iter,
            "total_s": wall,
            "init_s": res.seconds["init"],
            "per_iter_s": res.seconds["lloyd"] / res.n_iter,
        }
    if is_primary():
        torch.save(results, args.result)
    logger.debug("rank %d done", get_rank())
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nproc(args: argparse.Namespace, name: str, n: int, d: int, k: int) -> dict[str, Any]:
    """Our kmeans in ``args.nproc`` processes against 1 process, on the same data, seeds and iterations."""
    world = args.nproc
    per_rank = None if args.threads is None else max(1, args.threads // world)
    out: dict[str, Any] = {"n": n, "d": d, "k": k, "iters": args.iters, "nproc": world, "threads_per_rank": per_rank}
    with tempfile.TemporaryDirectory() as tmp:
        single = {}
        for method in OURS:
            path = str(Path(tmp) / f"{method}.pt")
            row = _spawn(method, args, n, d, k, save=path)
            single[method] = (row, torch.load(path, weights_only=True))
        result = Path(tmp) / "dist.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
        flags = Path(tmp) / "flags.json"
        flags.write_text(json.dumps(["--result", str(result)] + _common_flags(args, n, d, k, per_rank)), "utf-8")
        cmd += [f"--master_port={_free_port()}", str(Path(__file__).resolve()), "--dist-worker", str(flags)]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=REPO, env=_worker_env(per_rank, args.omp_passive), capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{world}-process run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        logger.info("%d-process run: %.1f s including start-up", world, time.perf_counter() - start)
        dist_results = torch.load(result, weights_only=True)
    for method, (row, ref) in single.items():
        got = dist_results[method]
        centre_diff = float((got["centres"] - ref["centres"]).abs().max())
        out[method] = {
            "one_process": {key: row[key] for key in ("total_s", "init_s", "per_iter_s", "n_iter", "inertia")},
            f"{world}_processes": {key: got[key] for key in ("total_s", "init_s", "per_iter_s", "n_iter", "inertia")},
            "labels_differing": int((got["labels"] != ref["labels"]).sum()),
            "max_centre_abs_diff": centre_diff,
            "inertia_rel_diff": abs(got["inertia"] - ref["inertia"]) / abs(ref["inertia"]),
            "labels_equal": bool(torch.equal(got["labels"], ref["labels"])),
            "centres_close": bool(torch.allclose(got["centres"], ref["centres"], atol=1e-5)),
        }
        logger.info("%s, 1 vs %d processes: %s", method, world, json.dumps(out[method]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# report


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables, one per size (and one per --nproc comparison)."""
    lines = []
    for name, size in results["sizes"].items():
        if "methods" not in size:
            continue
        lines += [
            f"**{name}**: N={size['n']:,} D={size['d']} K={size['k']:,}, {size['iters']} iterations, "
            f"{results['threads']} threads{', OMP_WAIT_POLICY=PASSIVE' if results['args']['omp_passive'] else ''}",
            "",
            "| method | total s | init s | s / iteration | iterations | bare mm / iteration | s / full iteration "
            "| bare mm / full iteration | total / faiss | extra peak MiB: allocated / resident | inertia |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, row in size["methods"].items():
            lines.append(
                f"| {method} | {row['total_s']:.2f} | {row['init_s']:.2f} | {row['per_iter_s']:.3f} | "
                f"{row['n_iter']} | {_fmt(row.get('mm_over_iter'), '.2f')} | {_fmt(row.get('full_iter_s'), '.3f')} | "
                f"{_fmt(row.get('mm_over_full_iter'), '.2f')} | {_fmt(row.get('total_over_faiss'), '.2f')} | "
                f"{row['peak_extra_mib']:.0f} / {row.get('peak_extra_rss_mib', float('nan')):.0f} | "
                f"{_fmt(row.get('inertia'), '.1f')} |"
            )
        for method, row in size.get("failed", {}).items():
            lines.append(f"| {method} | {row['error']} |")
        loads = [v for row in size["methods"].values() for v in (row["loadavg_start"], row["loadavg_end"])]
        lines.append("")
        lines.append(f"1-minute load average around the runs: {min(loads):.1f} to {max(loads):.1f}.")
        mm = size["methods"].get("mm")
        if mm is not None:
            lines.append(
                f"Bare mm with a new output per call: {mm['alloc']['per_call_s']:.3f} s per call "
                f"(into a preallocated output: {mm['per_call_s']:.3f} s). Data: {mm['data_mib']:.0f} MiB."
            )
        lines.append("")
    for name, comp in results.get("nproc", {}).items():
        world = comp["nproc"]
        lines += [
            f"**{name}, 1 vs {world} processes** (gloo, {comp['threads_per_rank']} thread(s) per rank): "
            f"N={comp['n']:,} D={comp['d']} K={comp['k']:,}, {comp['iters']} iterations",
            "",
            f"| init | 1-process total s | {world}-process total s | labels differing | max abs centre diff "
            "| inertia rel diff |",
            "|---|---|---|---|---|---|",
        ]
        for method in OURS:
            row = comp[method]
            lines.append(
                f"| {method} | {row['one_process']['total_s']:.2f} | {row[f'{world}_processes']['total_s']:.2f} | "
                f"{row['labels_differing']} | {row['max_centre_abs_diff']:.1e} | {row['inertia_rel_diff']:.1e} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        Path(args.result).write_text(json.dumps(run_worker(args)), encoding="utf-8")
        return 0
    if args.dist_worker is not None:
        run_dist_worker(get_args_parser().parse_args(json.loads(Path(args.dist_worker).read_text("utf-8"))))
        return 0
    results: dict[str, Any] = {
        "args": vars(args),
        "environment": environment(args.device),
        "threads": args.threads if args.threads is not None else torch.get_num_threads(),
        "sizes": {},
    }
    if _faiss_available():
        import faiss

        results["environment"]["faiss"] = faiss.__version__
    for name, (n, d, k) in _sizes(args).items():
        if args.nproc > 1:
            results.setdefault("nproc", {})[name] = run_nproc(args, name, n, d, k)
        else:
            results["sizes"][name] = run_size(args, name, n, d, k)
    table = markdown(results)
    logger.info("results:\n%s", table)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s", args.output)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
        logger.info("wrote %s", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
