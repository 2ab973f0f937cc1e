"""torchrun worker for tests/model/test_transface_vit.py: one EHSM-weighted step of a TransFace recognizer on 2 ranks.

    python -m torch.distributed.run --nproc_per_node=2 tests/model/_transface_dist_worker.py BATCH.pt OUT.pt

Every rank builds the same seeded model (``CONFIG``), takes its contiguous half of the saved batch and runs forward
and backward through DDP (backbone, with its token stds) and Partial FC (centres sharded, EHSM weights gathered) in
eval mode (BatchNorm on running statistics, so the per-sample computation does not depend on how the batch is split).
Rank 0 saves the loss, the mean EHSM weight, the backbone gradients and the full centre gradient.
"""

from __future__ import annotations

import sys

import torch

from model.recognition import FaceRecognizer, RecognitionConfig
from utils.distributed import cleanup, get_rank, get_world_size, init_distributed, is_primary

CONFIG = {
    "arch": "transface_vit_t",
    "img_size": 36,
    "patch_size": 9,
    "embedding_size": 16,
    "num_classes": 5,
    "drop_path": 0.0,
    "ehsm": True,
}


def main(batch_path: str, out_path: str) -> None:
    device = init_distributed("cpu")
    batch = torch.load(batch_path, weights_only=True)
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**CONFIG))
    model.prepare_for_distributed_training(device)
    model.eval()
    n = batch["labels"].numel() // get_world_size()
    rows = slice(get_rank() * n, (get_rank() + 1) * n)
    out = model(batch["images"][rows], batch["labels"][rows])
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.backbone.named_parameters() if p.grad is not None}
    centre_grad = model.partial_fc.gather_classes(model.partial_fc.weight.grad)
    if is_primary():
        saved = {"loss": out["loss"].detach(), "ehsm_weight": out["ehsm_weight"], "backbone": grads}
        torch.save({**saved, "centres": centre_grad}, out_path)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
