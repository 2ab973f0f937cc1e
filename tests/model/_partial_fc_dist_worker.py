"""torchrun worker for tests/model/test_partial_fc.py: Partial FC on 2 ranks, results gathered and saved by rank 0.

    python -m torch.distributed.run --nproc_per_node=2 tests/model/_partial_fc_dist_worker.py OUT.pt

Every rank builds the same global data (``make_batches``), feeds its contiguous rows to ``PartialFC`` and gathers the
losses, the embedding gradients of all ranks (in rank order) and the full centre gradient; the test recomputes them in
one process with a plain full classifier.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from model.margin_heads import GBCosFace, build_margin_head
from model.partial_fc import INIT_BLOCK, PartialFC
from utils.distributed import (
    all_gather_ints,
    all_gather_variable,
    cleanup,
    gather_shards_to_primary,
    get_rank,
    init_distributed,
    is_primary,
)

DIM = 8
CLASSES = 11  # shards of 5 and 6 classes
HEAD_ARGS = {"arcface": {}, "adaface": {"t_alpha": 0.5}, "gbcosface": {}}
SAMPLED_CLASSES = 40  # 20 per rank; sample rate 0.5 keeps int(0.5 * 20) = 10 or the positives if more
SAMPLE_RATE = 0.5
GATHER_BLOCKS = (1, 2, 5, 64)  # rows rank 0 receives per round: 1 and 2 -> 1 per rank, 5 -> 2 per rank, 64 -> 32


def make_batches(sizes: list[int], steps: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Centres (CLASSES, DIM) and ``steps`` global batches of sum(sizes) embeddings with norms between 5 and 40."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    directions = torch.randn(steps, n, DIM, generator=gen)
    norms = 5.0 + 35.0 * torch.rand(steps, n, 1, generator=gen)
    return {
        "weight": 0.1 * torch.randn(CLASSES, DIM, generator=gen),
        "embeddings": torch.nn.functional.normalize(directions, dim=2) * norms,
        "labels": torch.randint(CLASSES, (steps, n), generator=gen),
    }


def local_rows(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def run_head(name: str, sizes: list[int]) -> dict:
    """Two training steps of PartialFC (r = 1) with head ``name``; per step the gathered loss and gradients."""
    data = make_batches(sizes)
    pfc = PartialFC(DIM, CLASSES, build_margin_head(name, **HEAD_ARGS[name]), seed=1)
    pfc.load_full_weight(data["weight"])
    rows = local_rows(sizes, get_rank())
    steps = []
    for step in range(data["labels"].shape[0]):
        emb = data["embeddings"][step, rows].clone().requires_grad_(True)
        out = pfc(emb, data["labels"][step, rows])
        out["loss"].backward()
        steps.append(
            {
                "loss": out["loss"].detach(),
                "accuracy": out["accuracy"],
                "embedding_grad": torch.cat(all_gather_variable(emb.grad)),
                "weight_grad": pfc.gather_classes(pfc.weight.grad),
                "buffers": {k: v.clone() for k, v in pfc.head.state_dict().items()},
            }
        )
        pfc.weight.grad = None
    return {"sizes": sizes, "data": data, "steps": steps}


def sample_weights(n: int) -> torch.Tensor:
    """EHSM-like per-sample weights in [1, 2) for a global batch of n."""
    return 1.0 + torch.rand(n, generator=torch.Generator().manual_seed(4))


def run_weighted(sizes: list[int]) -> dict:
    """One ArcFace step with per-sample loss weights (TransFace's EHSM), for each normalisation: the loss and the
    gathered gradients."""
    data = make_batches(sizes, steps=1)
    weights = sample_weights(sum(sizes))
    rows = local_rows(sizes, get_rank())
    out = {"sizes": sizes, "data": data, "sample_weights": weights}
    for normalise in ("batch", "weights"):
        pfc = PartialFC(DIM, CLASSES, build_margin_head("arcface"), seed=1)
        pfc.load_full_weight(data["weight"])
        emb = data["embeddings"][0, rows].clone().requires_grad_(True)
        loss = pfc(emb, data["labels"][0, rows], weights[rows], weight_normalise=normalise)["loss"]
        loss.backward()
        out[normalise] = {
            "loss": loss.detach(),
            "embedding_grad": torch.cat(all_gather_variable(emb.grad)),
            "weight_grad": pfc.gather_classes(pfc.weight.grad),
        }
    return out


def run_sampling() -> dict:
    """One ArcFace step with sample rate 0.5: the classes whose centre got a gradient, and the loss."""
    gen = torch.Generator().manual_seed(3)
    # classes 0-19 live on rank 0 (12 distinct positives > 10 kept), 20-39 on rank 1 (3 positives + 7 negatives)
    labels = torch.tensor([0, 1, 2, 2, 21, 25, 3, 4, 5, 6, 7, 8, 9, 10, 11, 30])
    embeddings = torch.randn(labels.numel(), DIM, generator=gen)
    # s = 8 keeps every softmax probability far from float32 underflow, so every kept centre gets a gradient
    pfc = PartialFC(DIM, SAMPLED_CLASSES, build_margin_head("arcface", s=8.0), sample_rate=SAMPLE_RATE, seed=2)
    rows = local_rows([8, 8], get_rank())
    out = pfc(embeddings[rows], labels[rows])
    out["loss"].backward()
    kept = torch.nonzero(pfc.weight.grad.abs().sum(1) > 0).squeeze(1) + pfc.class_start
    return {
        "labels": labels,
        "embeddings": embeddings,
        "weight": pfc.full_weight(),
        "loss": out["loss"].detach(),
        "kept": all_gather_variable(kept),
        "step": pfc.step,
    }


def run_bad_label() -> list[str]:
    """Rank 1 passes label 99 (of 11): every rank must raise; returns each rank's message."""
    pfc = PartialFC(DIM, CLASSES, build_margin_head("arcface"), seed=1)
    labels = torch.tensor([1, 2]) if get_rank() == 0 else torch.tensor([3, 99])
    try:
        pfc(torch.randn(2, DIM), labels)
        message = "no error"
    except ValueError as error:
        message = str(error)
    messages = [None, None]
    dist.all_gather_object(messages, message)
    return messages


def run_checkpoint() -> dict:
    """Seeded initial centres, full_weight / gather_classes / shard_classes on 2 ranks, and the block gather to rank 0
    (``gather_shards_to_primary``) of 11 rows (shards of 5 and 6) in blocks smaller and larger than a shard."""
    # rank 1's classes [2052, 4101) start inside the first init block and end inside the second
    wide = PartialFC(DIM, INIT_BLOCK + 5, build_margin_head("arcface"), seed=7)
    pfc = PartialFC(DIM, CLASSES, build_margin_head("arcface"), seed=7)
    table = torch.arange(CLASSES * 3, dtype=torch.float32).view(CLASSES, 3)
    shard = pfc.shard_classes(table)
    ids = torch.arange(100, 100 + CLASSES)[pfc.class_start : pfc.class_end]  # 1-D int64 rows
    blocks = {block: gather_shards_to_primary(shard, CLASSES, block) for block in GATHER_BLOCKS}
    blocks["ids"] = gather_shards_to_primary(ids, CLASSES, 2)
    returned = [None, None]
    dist.all_gather_object(returned, {name: value is not None for name, value in blocks.items()})
    return {
        "initial": wide.full_weight(),
        "shards": all_gather_variable(shard),
        "round_trip": pfc.gather_classes(shard * 2),
        "range": (pfc.class_start, pfc.class_end),
        "blocks": blocks,
        "returned": returned,
        "batch_sizes": all_gather_ints(3 + 4 * get_rank()),
    }


def run_gbcosface_ddp() -> list[list[float]]:
    """GB-CosFace without Partial FC under DDP: the batch mean of cos_v is all-reduced (global mean over 3 rows)."""
    head = GBCosFace()
    if get_rank() == 0:
        batches = [([0.9, 0.8], [0.3, 0.2]), ([0.8, 0.9], [0.6, 0.5])]  # cos_v 0.6, 0.5 then 0.7, 0.7
    else:
        batches = [([0.7], [0.1]), ([1.0], [1.0])]  # cos_v 0.4 then 1.0
    pv = []
    for cos_p, cos_n in batches:
        head.loss_from_parts(torch.tensor(cos_p), torch.tensor(cos_n), batch_is_global=False)
        pv.append(head.pv.item())
    everyone = [None, None]
    dist.all_gather_object(everyone, pv)
    return everyone


def main(out_path: str) -> int:
    init_distributed("cpu")
    results = {
        "heads": {name: run_head(name, [6, 6]) for name in HEAD_ARGS},
        "variable": run_head("arcface", [7, 3]),
        "weighted": run_weighted([7, 3]),
        "sampling": run_sampling(),
        "bad_label": run_bad_label(),
        "checkpoint": run_checkpoint(),
        "gbcosface_ddp": run_gbcosface_ddp(),
    }
    if is_primary():
        torch.save(results, out_path)
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
