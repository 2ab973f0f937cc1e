"""Partial FC training-step cost on the CPU: ArcFace head, sharded classifier, sampled centres, one process.

A step is: random (B, D) embeddings requiring grad (no backbone) -> ``PartialFC`` forward (cosines, ArcFace margin,
softmax cross-entropy over the kept centres) -> backward -> SGD step of the centre matrix (momentum 0.9, weight decay
5e-4, as arcface_torch) -> ``zero_grad(set_to_none=True)``. Each configuration (number of classes x sample rate) runs
in its own subprocess so that its peak memory is its own: the peak resident set size (``resource.getrusage``
``ru_maxrss``) minus the resident size after imports, which covers the centres, their gradient, the momentum buffer,
saved activations and temporaries. Throughput is B / median step time over ``--steps`` timed steps after
``--warmup`` steps; results and library versions are logged and written as JSON.

Usage (from the repository root):
    python -m benchmarks.partial_fc_step --threads 2 --output partial_fc_step.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import add_common_args, environment, save_results, setup
from model.margin_heads import build_margin_head
from model.partial_fc import PartialFC

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
_RESULT_PREFIX = "PARTIAL_FC_RESULT "


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--classes", type=int, nargs="+", default=[100_000, 1_000_000], help="class counts (default: 100000 1000000)"
    )
    parser.add_argument(
        "--sample-rates", type=float, nargs="+", default=[1.0, 0.1], help="Partial FC sample rates (default: 1.0 0.1)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="embeddings per step B (default: 128)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D (default: 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="centre and data seed (default: 0)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the configurations in this process (used by the per-configuration subprocesses; default: off)",
    )
    add_common_args(parser, device=False, threads_default=2)
    return parser


def _max_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_config(num_classes: int, sample_rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``--warmup + --steps`` training steps of one configuration in this process.

    Args:
        num_classes: number of classes C.
        sample_rate: Partial FC sample rate r.
        args: the benchmark arguments (batch size, dim, steps, warm-up, seed).

    Returns:
        Step times, throughput and memory of the configuration.
    """
    baseline = _max_rss_mib()
    pfc = PartialFC(args.dim, num_classes, build_margin_head("arcface"), sample_rate=sample_rate, seed=args.seed)
    optimizer = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    times = []
    for step in range(args.warmup + args.steps):
        embeddings = torch.randn(args.batch_size, args.dim, generator=gen).requires_grad_(True)
        labels = torch.randint(num_classes, (args.batch_size,), generator=gen)
        start = time.perf_counter()
        out = pfc(embeddings, labels)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if step >= args.warmup:
            times.append(seconds)
    median = statistics.median(times)
    weight_mib = pfc.weight.numel() * pfc.weight.element_size() / 2**20
    return {
        "classes": num_classes,
        "sample_rate": sample_rate,
        "kept_centres_last_step": max(int(sample_rate * num_classes), int(labels.unique().numel())),
        "step_seconds_median": median,
        "step_seconds": times,
        "samples_per_second": args.batch_size / median,
        "peak_rss_delta_mib": _max_rss_mib() - baseline,
        "centres_mib": weight_mib,
        "loss_last": float(out["loss"]),
    }


def run_in_subprocess(num_classes: int, sample_rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """``run_config`` in a fresh interpreter, so that its peak memory is measured alone."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.partial_fc_step",
        "--in-process",
        "--classes",
        str(num_classes),
        "--sample-rates",
        str(sample_rate),
        *("--batch-size", str(args.batch_size), "--dim", str(args.dim), "--steps", str(args.steps)),
        *("--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed)),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration C={num_classes} r={sample_rate} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    return json.loads(lines[-1][len(_RESULT_PREFIX) :])


def main(args: argparse.Namespace) -> int:
    """Runs every configuration (each in its own subprocess unless --in-process) and logs / writes the results."""
    setup(args.threads)
    results = []
    for num_classes in args.classes:
        for rate in args.sample_rates:
            if args.in_process:
                result = run_config(num_classes, rate, args)
                print(_RESULT_PREFIX + json.dumps(result), flush=True)
            else:
                result = run_in_subprocess(num_classes, rate, args)
            logger.info(
                "C=%d r=%g: %.3f s/step, %.1f samples/s, peak RSS +%.0f MiB (centres %.0f MiB)",
                num_classes,
                rate,
                result["step_seconds_median"],
                result["samples_per_second"],
                result["peak_rss_delta_mib"],
                result["centres_mib"],
            )
            results.append(result)
    if not args.in_process:
        report = {"args": vars(args), "environment": environment(torch.device("cpu")), "results": results}
        save_results(report, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
