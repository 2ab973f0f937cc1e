"""IJB-scale pair scoring: our blocked-GEMM ``pair_scores`` against the straightforward gathered dot products.

At IJB-B scale (12,115 templates, 8,010,270 pairs of which 10,270 genuine, 512-d unit features) it times, in the
same run and on the same random data:

1. ``utils.evaluation.ijb.pair_scores``: template-by-template GEMM blocks (score matrix under ``--max-block-mb``)
   from which each block's pairs are read out;
2. the straightforward scoring of insightface's ``verification``: gather both template features of each pair and
   take row-wise dot products, in blocks of ``--baseline-block`` (100,000) pairs;
3. ROC and TAR@FAR at 1e-6 .. 1e-1 on the 8M scores (``utils.evaluation.roc``), and, unless ``--skip-sklearn``,
   insightface's own procedure (``sklearn.metrics.roc_curve``, reversed, ``np.argmin``) for a check and a time.

The two score vectors must agree to ``--atol`` (absolute, float32); the TARs of our ``drop_intermediate=True`` ROC
must equal insightface's exactly. ``--layout bipartite`` draws the pairs between 1,845 "probe" and the other
templates, as the real IJB-B pair list does (1,845 distinct first and 10,270 distinct second templates); the default
``random`` draws both members uniformly (every template on both sides, the harder case for the GEMM).

Usage: ``python -m benchmarks.pair_scoring --threads 2 --output pair_scoring.json``
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.metrics import roc_curve as sklearn_roc_curve

from benchmarks.common import add_common_args, environment, resolve_device, save_results, setup, timed
from utils.evaluation.ijb import pair_scores
from utils.evaluation.roc import DEFAULT_FARS, RocCurve, far_label, roc_curve, tar_at_far

logger = logging.getLogger(__name__)

IJBB_PROBE_TEMPLATES = 1845


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description="Blocked-GEMM pair scoring against gathered dot products.")
    parser.add_argument("--templates", type=int, default=12_115, help="number of templates (default: 12115)")
    parser.add_argument("--pairs", type=int, default=8_010_270, help="number of pairs (default: 8010270)")
    parser.add_argument("--genuine", type=int, default=10_270, help="genuine pairs among them (default: 10270)")
    parser.add_argument("--dim", type=int, default=512, help="feature width (default: 512)")
    parser.add_argument(
        "--layout", choices=("random", "bipartite"), default="random", help="how pairs are drawn (default: random)"
    )
    parser.add_argument("--max-block-mb", type=float, default=256, help="our block memory cap in MiB (default: 256)")
    parser.add_argument("--baseline-block", type=int, default=100_000, help="baseline pairs per block (default: 1e5)")
    parser.add_argument("--atol", type=float, default=1e-5, help="allowed absolute score difference (default: 1e-5)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each scorer, best kept (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    parser.add_argument("--skip-sklearn", action="store_true", help="skip the insightface/sklearn TAR@FAR check")
    add_common_args(parser)
    return parser


def make_problem(
    templates: int, pairs: int, genuine: int, dim: int, layout: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random unit features (templates, dim), pair members (pairs,) x 2 and labels (pairs,) with ``genuine`` ones."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(templates, dim, generator=gen), dim=1)
    if layout == "random":
        first = torch.randint(templates, (pairs,), generator=gen)
        second = torch.randint(templates, (pairs,), generator=gen)
    else:
        probes = min(IJBB_PROBE_TEMPLATES, templates - 1)
        first = torch.randint(probes, (pairs,), generator=gen)
        second = torch.randint(probes, templates, (pairs,), generator=gen)
    labels = torch.zeros(pairs, dtype=torch.bool)
    labels[torch.randperm(pairs, generator=gen)[:genuine]] = True
    return feats, first, second, labels


def gathered_scores(feats: torch.Tensor, first: torch.Tensor, second: torch.Tensor, block: int) -> torch.Tensor:
    """The straightforward scorer: gather both members' features, row-wise dot products, ``block`` pairs at a time."""
    out = feats.new_empty(first.shape[0])
    for start in range(0, first.shape[0], block):
        stop = start + block
        out[start:stop] = (feats[first[start:stop]] * feats[second[start:stop]]).sum(-1)
    return out


def _roc_and_tars(scores: torch.Tensor, labels: torch.Tensor) -> tuple[RocCurve, dict[float, float]]:
    curve = roc_curve(scores, labels)
    return curve, tar_at_far(curve, fars=DEFAULT_FARS)


def insightface_tar_at_far(labels: np.ndarray, scores: np.ndarray, fars: tuple[float, ...]) -> dict[float, float]:
    """insightface ``ijb_evals.plot_roc_and_calculate_tpr``: sklearn ROC, reversed, first argmin of |fpr - far|."""
    fpr, tpr, _ = sklearn_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {far: float(tpr[np.argmin(np.abs(fpr - far))]) for far in fars}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every timing of the module docstring and returns the results dict."""
    device = resolve_device(args.device)
    feats, first, second, labels = make_problem(
        args.templates, args.pairs, args.genuine, args.dim, args.layout, args.seed
    )
    feats, first, second = feats.to(device), first.to(device), second.to(device)
    logger.info(
        "data: %d templates, %d pairs (%d genuine), D=%d, layout %s, on %s (%d torch threads)",
        args.templates,
        args.pairs,
        args.genuine,
        args.dim,
        args.layout,
        device,
        torch.get_num_threads(),
    )
    block_bytes = int(args.max_block_mb * 2**20)
    pair_scores(feats, first[:1000], second[:1000], max_block_bytes=block_bytes)  # warm-up
    ours, ours_s = timed(lambda: pair_scores(feats, first, second, max_block_bytes=block_bytes), device, args.repeats)
    logger.info("ours (blocked GEMM): %.2f s", ours_s)
    baseline, baseline_s = timed(
        lambda: gathered_scores(feats, first, second, args.baseline_block), device, args.repeats
    )
    logger.info("baseline (gathered dot products, %d pairs a block): %.2f s", args.baseline_block, baseline_s)
    max_diff = float((ours - baseline).abs().max())
    if max_diff > args.atol:
        raise AssertionError(f"scores differ by up to {max_diff:.3g}, more than --atol {args.atol:g}")
    logger.info("speed-up %.2fx, max |ours - baseline| = %.3g (atol %g)", baseline_s / ours_s, max_diff, args.atol)

    labels_dev = labels.to(device)
    (curve, tars), roc_s = timed(lambda: _roc_and_tars(ours, labels_dev), device, args.repeats)
    logger.info("ROC + TAR@FAR on %d scores: %.2f s (%d ROC points)", args.pairs, roc_s, len(curve.fpr))
    results: dict[str, Any] = {
        "ours_seconds": ours_s,
        "baseline_seconds": baseline_s,
        "speedup": baseline_s / ours_s,
        "max_abs_diff": max_diff,
        "atol": args.atol,
        "roc_tar_at_far_seconds": roc_s,
        "roc_points": len(curve.fpr),
        "tar_at_far": {far_label(far): tar for far, tar in tars.items()},
    }
    if not args.skip_sklearn:
        scores_np, labels_np = ours.cpu().numpy(), labels.numpy()
        reference, sklearn_s = timed(
            lambda: insightface_tar_at_far(labels_np, scores_np, DEFAULT_FARS), torch.device("cpu")
        )
        dropped = tar_at_far(ours, labels_dev, DEFAULT_FARS, drop_intermediate=True)
        if dropped != reference:
            raise AssertionError(
                f"TAR@FAR with drop_intermediate=True {dropped} differs from insightface's {reference}"
            )
        logger.info("insightface/sklearn TAR@FAR: %.2f s, equal to ours with drop_intermediate=True", sklearn_s)
        results["insightface_sklearn_seconds"] = sklearn_s
        results["insightface_tar_at_far"] = {far_label(far): tar for far, tar in reference.items()}
    return results


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark; logs the results (arguments, environment, timings) and writes them to --output."""
    setup(args.threads)
    env = environment(resolve_device(args.device), {"numpy": np.__version__, "sklearn": sklearn.__version__})
    save_results({"args": vars(args), "environment": env, "results": run_benchmark(args)}, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
