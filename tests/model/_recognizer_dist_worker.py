"""torchrun worker for tests/model/test_recognition_model.py: one clipped SGD step of FaceRecognizer on 2 ranks.

    python -m torch.distributed.run --nproc_per_node=2 tests/model/_recognizer_dist_worker.py BATCH.pt OUT.pt

Every rank builds the same seeded model, takes its contiguous half of the saved batch, runs forward and backward
through DDP (backbone) and Partial FC (centres, sharded) in eval mode (BatchNorm on running statistics, so the
per-sample computation does not depend on how the batch is split), clips the gradients to the batch file's ``clip``
(``FaceRecognizer.clip_gradients``, as ``--clip-grad`` does) and takes one SGD step (lr ``LR``). Rank 0 saves the
loss, the backbone gradients and the full centre gradient before clipping, and every rank's backbone after the step.
Last, ``checkpoint_in_blocks`` saves and reloads a checkpoint whose centres are gathered to rank 0 in small blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import model.partial_fc as partial_fc_module
from model.recognition import FaceRecognizer, RecognitionConfig
from utils.distributed import all_gather_variable, cleanup, get_rank, get_world_size, init_distributed, is_primary

LR = 0.1


def checkpoint_in_blocks(model: FaceRecognizer, path: Path) -> dict:
    """An SGD step with momentum, then the checkpoint (weights and optimiser state) gathered to rank 0 in blocks of
    ``CHECKPOINT_BLOCK = 2`` classes, one per rank and round (the shards hold 2 and 3 classes); rank 0 saves it to
    ``path`` and every rank loads it into a fresh model and optimiser.

    Returns:
        Rank 0's gathered centres and momentum (None on rank 1), the shards concatenated by an all-gather, and for
        each rank whether its result held the full tensors and whether the reload restored its shards exactly.
    """
    partial_fc_module.CHECKPOINT_BLOCK = 2
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    optimizer.step()  # the momentum buffers: copies of the gradients
    centres = model.partial_fc.weight
    index = [p is centres for p in model.parameters()].index(True)  # the centres' entry in the optimiser state
    state, optimizer_state = model.checkpoint_state_dict(), model.optimizer_state_dict(optimizer)
    if is_primary():
        torch.save({"state_dict": state, "optimizer": optimizer_state}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    fresh = FaceRecognizer(model.cfg)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=LR, momentum=0.9)
    fresh.load_checkpoint_state_dict(saved["state_dict"])
    fresh.load_optimizer_state_dict(fresh_optimizer, saved["optimizer"])
    momentum = optimizer.state[centres]["momentum_buffer"]
    reloaded = torch.equal(fresh.partial_fc.weight, centres) and torch.equal(
        fresh_optimizer.state[fresh.partial_fc.weight]["momentum_buffer"], momentum
    )
    report = {
        "holds_centres": "partial_fc.weight" in state,
        "holds_momentum": "momentum_buffer" in optimizer_state["state"][index],
        "reloaded": reloaded,
    }
    ranks = [None] * get_world_size()
    dist.all_gather_object(ranks, report)
    return {
        "centres": state.get("partial_fc.weight"),
        "momentum": optimizer_state["state"][index].get("momentum_buffer"),
        "centre_shards": torch.cat(all_gather_variable(centres.detach())),
        "momentum_shards": torch.cat(all_gather_variable(momentum)),
        "ranks": ranks,
    }


def main(batch_path: str, out_path: str) -> None:
    device = init_distributed("cpu")
    batch = torch.load(batch_path, weights_only=True)
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**batch["config"]))
    model.prepare_for_distributed_training(device)
    model.eval()
    n = batch["labels"].numel() // get_world_size()
    rows = slice(get_rank() * n, (get_rank() + 1) * n)
    out = model(batch["images"][rows], batch["labels"][rows])
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.backbone.named_parameters() if p.grad is not None}
    centre_grad = model.partial_fc.gather_classes(model.partial_fc.weight.grad)
    model.clip_gradients(batch["clip"])
    torch.optim.SGD(model.parameters(), lr=LR).step()
    backbone = torch.cat([p.detach().flatten() for p in model.backbone.parameters()])
    backbones = [torch.empty_like(backbone) for _ in range(get_world_size())]
    dist.all_gather(backbones, backbone)
    checkpoint = checkpoint_in_blocks(model, Path(out_path).with_name("checkpoint.pt"))
    if is_primary():
        saved = {"loss": out["loss"].detach(), "backbone": grads, "centres": centre_grad, "stepped": backbones}
        saved["checkpoint"] = checkpoint
        torch.save(saved, out_path)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
