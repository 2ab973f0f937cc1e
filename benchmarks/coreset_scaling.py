"""FaceCoresetNet's aggregation cost against template size, and templates per second at IJB-C scale.

1. One template of N = 10 ... 10,000 random embeddings (``--sizes``): wall time of the aggregator in eval mode
   (``model.coreset.CoresetAggregator``, K = ``--core-size``) and of mean pooling (mean of the unit embeddings), and
   the aggregator's FLOPs (``torch.utils.flop_counter``). The paper claims a cost linear in N: FLOPs(N) / FLOPs(10)
   should grow as N (no N x N tensor; the cross-attention scores are heads x K x N).
2. IJB-C scale: 23,124 templates (the number of templates of IJB-C's 1:1 protocol, insightface's
   ``ijbc_face_tid_mid.txt``) with 469,375 faces in all, template sizes drawn log-normal (sigma ``--size-sigma``) and
   scaled to that total: ``utils.evaluation.ijb.aggregated_template_features`` (size-bucketed padded batches) against
   ``mean_template_features``, as templates per second.

Random embeddings and an untrained aggregator: the cost does not depend on the values.

Usage: ``python -m benchmarks.coreset_scaling --threads 1 --output coreset_scaling.json``
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import add_common_args, environment, resolve_device, save_results, setup, timed
from model.coreset import DEFAULT_CORE_SIZE, CoresetAggregator
from utils.evaluation.ijb import aggregated_template_features, mean_template_features

logger = logging.getLogger(__name__)

IJBC_TEMPLATES = 23_124
IJBC_FACES = 469_375


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description="FaceCoresetNet aggregation cost against template size.")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10, 100, 1000, 10_000], help="template sizes (default: 10 ... 1e4)"
    )
    parser.add_argument("--dim", type=int, default=512, help="embedding size (default: 512)")
    parser.add_argument("--core-size", type=int, default=DEFAULT_CORE_SIZE, help="K (default: 3)")
    parser.add_argument("--templates", type=int, default=IJBC_TEMPLATES, help="IJB-scale templates (default: 23124)")
    parser.add_argument("--faces", type=int, default=IJBC_FACES, help="IJB-scale faces (default: 469375)")
    parser.add_argument("--size-sigma", type=float, default=1.0, help="log-normal sigma of sizes (default: 1.0)")
    parser.add_argument("--max-batch-rows", type=int, default=1 << 16, help="padded rows per call (default: 65536)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    add_common_args(parser)
    return parser


def _template(n: int, dim: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    feats = torch.randn(1, n, dim, generator=generator).to(device)
    norms = (10.0 + 30.0 * torch.rand(1, n, generator=generator)).to(device)
    return torch.nn.functional.normalize(feats, dim=-1), norms


def template_sizes(templates: int, faces: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``templates`` log-normal sizes >= 1 summing to ``faces`` (largest rounded remainder adjusted)."""
    raw = rng.lognormal(0.0, sigma, templates)
    sizes = np.maximum(1, np.round(raw * faces / raw.sum())).astype(np.int64)
    sizes[np.argmax(sizes)] += faces - sizes.sum()
    return sizes


@torch.no_grad()
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    model = CoresetAggregator(args.dim, args.core_size).to(device).eval()
    per_size = []
    for n in args.sizes:
        units, norms = _template(n, args.dim, generator, device)
        counter = FlopCounterMode(display=False)
        with counter:
            model(units, norms)
        _, agg_s = timed(lambda: model(units, norms), device, args.repeats)
        _, mean_s = timed(lambda: torch.nn.functional.normalize(units.mean(1), dim=-1), device, args.repeats)
        per_size.append({"size": n, "flops": counter.get_total_flops(), "aggregator_s": agg_s, "mean_s": mean_s})
        logger.info(
            "N = %d: aggregator %.3g s (%.3g GFLOP), mean %.3g s", n, agg_s, per_size[-1]["flops"] / 1e9, mean_s
        )
    base = per_size[0]
    for row in per_size:
        row["flops_ratio"] = row["flops"] / base["flops"]
        row["size_ratio"] = row["size"] / base["size"]
        row["time_ratio"] = row["aggregator_s"] / base["aggregator_s"]

    sizes = template_sizes(args.templates, args.faces, args.size_sigma, np.random.default_rng(args.seed))
    templates = torch.from_numpy(np.repeat(np.arange(args.templates), sizes)).to(device)
    embeddings = (torch.randn(len(templates), args.dim, generator=generator) * 20).to(device)

    def aggregate(units: torch.Tensor, norms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(units, norms, mask)[0]

    _, agg_s = timed(
        lambda: aggregated_template_features(embeddings, templates, aggregate, max_batch_rows=args.max_batch_rows),
        device,
        args.repeats,
    )
    _, mean_s = timed(lambda: mean_template_features(embeddings, templates), device, args.repeats)
    ijb = {
        "templates": args.templates,
        "faces": int(sizes.sum()),
        "largest_template": int(sizes.max()),
        "median_template": float(np.median(sizes)),
        "aggregator_s": agg_s,
        "aggregator_templates_per_s": args.templates / agg_s,
        "mean_s": mean_s,
        "mean_templates_per_s": args.templates / mean_s,
        "slowdown": agg_s / mean_s,
    }
    logger.info(
        "IJB-C scale (%d templates, %d faces): aggregator %.1f s (%.0f templates/s), mean pooling %.2f s (%.0f/s)",
        args.templates,
        ijb["faces"],
        agg_s,
        ijb["aggregator_templates_per_s"],
        mean_s,
        ijb["mean_templates_per_s"],
    )
    return {"per_size": per_size, "ijb_scale": ijb}


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark; logs the results (arguments, environment, timings) and writes them to --output."""
    setup(args.threads)
    env = environment(resolve_device(args.device))
    save_results({"args": vars(args), "environment": env, "results": run_benchmark(args)}, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
