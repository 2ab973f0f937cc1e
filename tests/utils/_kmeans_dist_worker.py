"""torchrun worker for tests/utils/test_kmeans.py: clusters contiguous shards and saves the gathered result.

    python -m torch.distributed.run --nproc_per_node=2 tests/utils/_kmeans_dist_worker.py OUT.pt [INIT]

Every rank builds the same data and seeds with INIT (default k-means++); rank 0 saves
``{"data": ..., "duplicates": ..., "init": INIT, "cases": {name: result}}`` to OUT.pt.
"""

from __future__ import annotations

import sys

import torch

from utils.distributed import all_gather_variable, cleanup, contiguous_shard, init_distributed, is_primary
from utils.kmeans import kmeans, semi_supervised_kmeans


def make_blobs(num_classes: int = 12, per_class: int = 40, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Well-separated Gaussian blobs in shuffled order, half the classes known, half of their points labelled."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) * 10.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = means[labels] + 0.3 * torch.randn(labels.numel(), dim, generator=gen)
    perm = torch.randperm(labels.numel(), generator=gen)
    x, labels = x[perm], labels[perm]
    known = labels < num_classes // 2
    labelled = known & (torch.rand(labels.numel(), generator=gen) < 0.5)
    return {"x": x, "labels": labels, "known": known, "labelled": labelled}


def make_duplicates(seed: int = 0) -> torch.Tensor:
    """Three distinct points repeated ten times each (K = 5 forces empty clusters)."""
    points = torch.tensor([[0.0, 0.0], [4.0, 4.0], [8.0, 0.0]]).repeat_interleave(10, 0)
    return points[torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))]


def run_cases(data: dict[str, torch.Tensor], duplicates: torch.Tensor, init: str = "k-means++") -> dict[str, dict]:
    """The cases compared between one and several processes, each on this rank's contiguous shard."""
    rows = contiguous_shard(data["x"].shape[0])
    num_classes = int(data["labels"].max()) + 1
    results = {
        "ss": semi_supervised_kmeans(
            data["x"][rows],
            num_classes,
            data["labels"][rows],
            data["labelled"][rows],
            n_init=3,
            seed=5,
            init=init,
            device="cpu",
            progress=False,
        ),
        "plain": kmeans(data["x"][rows], num_classes, n_init=3, seed=5, init=init, device="cpu", progress=False),
        "duplicates": kmeans(
            duplicates[contiguous_shard(duplicates.shape[0])],
            5,
            n_init=2,
            seed=1,
            init=init,
            device="cpu",
            progress=False,
        ),
    }
    return {
        name: {
            "labels": torch.cat(all_gather_variable(r.labels)),
            "centres": r.centres,
            "inertia": r.inertia,
            "n_iter": r.n_iter,
            "best_restart": r.best_restart,
        }
        for name, r in results.items()
    }


def main(out_path: str, init: str = "k-means++") -> int:
    init_distributed("cpu")
    data, duplicates = make_blobs(), make_duplicates()
    cases = run_cases(data, duplicates, init)
    if is_primary():
        torch.save({"data": data, "duplicates": duplicates, "init": init, "cases": cases}, out_path)
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
