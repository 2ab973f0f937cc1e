"""SS-k-means speed: our torch k-means against scikit-learn's KMeans, and its GEMM efficiency per Lloyd iteration.

On synthetic L2-normalised features (noisy points around K random unit directions) it times:

1. a bare ``torch.mm`` of the distance-GEMM shape (N, D) x (D, K), the rate one Lloyd iteration can hope for;
2. our Lloyd iterations alone (fixed start, ``tol=0``), reported as 2*N*K*D flops per iteration and as a fraction
   of the bare-mm rate (target: >= 50 %);
3. full fits with the same K, iteration cap, restart count and tolerance: our ``kmeans`` (plain, the same
   algorithm as scikit-learn), our ``semi_supervised_kmeans`` (part of the known classes labelled), and
   ``sklearn.cluster.KMeans(init="k-means++", algorithm="lloyd")`` on the same float32 data.

scikit-learn scales ``tol`` by the mean feature variance and measures centre shifts differently, so iteration counts
of the fits can differ; per-iteration times are reported next to the totals. Results (with library versions, device
and thread settings) are logged and written as JSON.

Usage: ``python -m benchmarks.ssk_vs_sklearn --n 20000 --dim 256 --k 200 --max-iter 50 --n-init 3 --output out.json``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import numpy as np
import scipy
import sklearn
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info, threadpool_limits

from benchmarks import common
from benchmarks.common import add_common_args, resolve_device, save_results, setup, timed
from utils.kmeans import kmeans, semi_supervised_kmeans

logger = logging.getLogger(__name__)

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description="Our (SS-)k-means against scikit-learn KMeans.")
    parser.add_argument("--n", type=int, default=50_000, help="number of points N (default: 50000)")
    parser.add_argument("--dim", type=int, default=768, help="feature width D (default: 768)")
    parser.add_argument("--k", type=int, default=1000, help="number of clusters K (default: 1000)")
    parser.add_argument("--max-iter", type=int, default=100, help="Lloyd iteration cap per restart (default: 100)")
    parser.add_argument("--n-init", type=int, default=3, help="k-means++ restarts (default: 3)")
    parser.add_argument("--tol", type=float, default=1e-4, help="convergence tolerance (default: 1e-4)")
    parser.add_argument("--lloyd-iters", type=int, default=10, help="iterations timed for the GEMM rate (default: 10)")
    parser.add_argument("--mm-repeats", type=int, default=10, help="timed bare torch.mm calls (default: 10)")
    parser.add_argument(
        "--labelled-frac",
        type=float,
        default=0.25,
        help="labelled fraction of the first K/2 classes for the SS fit (default: 0.25)",
    )
    parser.add_argument("--noise", type=float, default=0.6, help="noise around the class directions (default: 0.6)")
    parser.add_argument("--seed", type=int, default=0, help="data and k-means seed (default: 0)")
    parser.add_argument("--skip-sklearn", action="store_true", help="time only our implementation")
    add_common_args(parser)
    return parser


def make_features(n: int, dim: int, k: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) unit-norm features around k random unit directions, and their class labels."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=1)
    labels = torch.randint(k, (n,), generator=gen)
    x = directions[labels] + noise / dim**0.5 * torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1), labels


def bare_mm_rate(x: torch.Tensor, k: int, repeats: int) -> dict[str, float]:
    """Seconds and GFLOP/s of torch.mm (N, D) x (D, K) in float32 (TF32 off), after two warm-up calls."""
    centres_t = x[:k].t().contiguous()
    flops = 2.0 * x.shape[0] * k * x.shape[1]
    prev = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        for _ in range(2):
            torch.mm(x, centres_t)
        _, seconds = timed(lambda: [torch.mm(x, centres_t) for _ in range(repeats)], x.device)
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev
    per_call = seconds / repeats
    return {"seconds": per_call, "gflops": flops / per_call / 1e9}


def lloyd_rate(x: torch.Tensor, k: int, iters: int, device: torch.device) -> dict[str, float]:
    """Seconds and GFLOP/s (2*N*K*D per iteration) of our Lloyd iterations from a fixed start, tol = 0.

    The time of a 2-iteration fit is subtracted from that of a (2 + iters)-iteration fit, so input checks and set-up
    do not count.
    """
    start = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:k]]

    def fit(n_iter: int) -> float:
        return timed(
            lambda: kmeans(x, k, n_init=1, max_iter=n_iter, tol=0.0, init_centres=start, device=device, progress=False),
            device,
        )[1]

    fit(1)  # warm-up
    per_iter = (fit(2 + iters) - fit(2)) / iters
    return {
        "iterations": iters,
        "seconds_per_iter": per_iter,
        "gflops": 2.0 * x.shape[0] * k * x.shape[1] / per_iter / 1e9,
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every timing of the module docstring and returns the results dict."""
    device = resolve_device(args.device)
    x_cpu, labels = make_features(args.n, args.dim, args.k, args.noise, args.seed)
    x = x_cpu.to(device)
    logger.info(
        "data: N=%d D=%d K=%d on %s (%d torch threads)", args.n, args.dim, args.k, device, torch.get_num_threads()
    )

    mm = bare_mm_rate(x, args.k, args.mm_repeats)
    logger.info("bare torch.mm: %.4f s, %.1f GFLOP/s", mm["seconds"], mm["gflops"])
    lloyd = lloyd_rate(x, args.k, args.lloyd_iters, device)
    lloyd["fraction_of_mm"] = lloyd["gflops"] / mm["gflops"]
    logger.info(
        "Lloyd iteration: %.4f s, %.1f GFLOP/s = %.0f%% of bare mm",
        lloyd["seconds_per_iter"],
        lloyd["gflops"],
        100 * lloyd["fraction_of_mm"],
    )

    fit_kwargs = dict(
        n_init=args.n_init, max_iter=args.max_iter, tol=args.tol, seed=args.seed, device=device, progress=False
    )
    ours, ours_s = timed(lambda: kmeans(x, args.k, **fit_kwargs), device)
    logger.info("torch kmeans: %.2f s, %d iterations (best restart), inertia %.4f", ours_s, ours.n_iter, ours.inertia)

    gen = torch.Generator().manual_seed(args.seed + 1)
    labelled = (labels < args.k // 2) & (torch.rand(args.n, generator=gen) < args.labelled_frac)
    ss, ss_s = timed(lambda: semi_supervised_kmeans(x, args.k, labels.to(device), labelled, **fit_kwargs), device)
    logger.info(
        "torch SS-kmeans: %.2f s, %d iterations, M=%d labelled classes", ss_s, ss.n_iter, ss.labelled_classes.numel()
    )

    results: dict[str, Any] = {
        "bare_mm": mm,
        "lloyd": lloyd,
        "torch_kmeans": {"seconds": ours_s, "n_iter": ours.n_iter, "inertia": ours.inertia},
        "torch_ss_kmeans": {
            "seconds": ss_s,
            "n_iter": ss.n_iter,
            "inertia": ss.inertia,
            "labelled_points": int(labelled.sum()),
            "labelled_classes": ss.labelled_classes.numel(),
        },
    }
    if not args.skip_sklearn:
        x_np = x_cpu.numpy()
        model = KMeans(
            args.k,
            init="k-means++",
            n_init=args.n_init,
            max_iter=args.max_iter,
            tol=args.tol,
            random_state=args.seed,
            algorithm="lloyd",
        )
        with threadpool_limits(limits=args.threads):
            _, sk_s = timed(lambda: model.fit(x_np), torch.device("cpu"))
        results["sklearn_kmeans"] = {"seconds": sk_s, "n_iter": int(model.n_iter_), "inertia": float(model.inertia_)}
        results["speedup_vs_sklearn"] = sk_s / ours_s
        logger.info(
            "sklearn KMeans: %.2f s, %d iterations, inertia %.4f -> torch is %.2fx faster",
            sk_s,
            model.n_iter_,
            model.inertia_,
            sk_s / ours_s,
        )
    return results


def environment(device: str | None) -> dict[str, Any]:
    """Library versions, machine, thread pools (threadpoolctl) and thread variables of a run on ``--device``."""
    return common.environment(
        resolve_device(device),
        {"sklearn": sklearn.__version__, "numpy": np.__version__, "scipy": scipy.__version__},
        threadpools=threadpool_info(),
        env={name: os.environ.get(name) for name in ENV_VARS},
    )


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark; logs the results (arguments, environment, timings) and writes them to --output."""
    setup(args.threads)
    report = {"args": vars(args), "environment": environment(args.device), "results": run_benchmark(args)}
    save_results(report, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
