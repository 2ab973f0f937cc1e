"""torchrun worker for tests/data_loader/test_datasets.py: every rank builds the same identity-folder benchmark.

    python -m torch.distributed.run --nproc_per_node=2 tests/data_loader/_datasets_dist_worker.py ROOT OUT_DIR BAD

Each rank saves ``OUT_DIR/rank<r>.pt``: what it built (labelled mask, labels, sample orders, class names), how many
images it opened while building, and the error of a second build after rank 0 overwrote the image BAD with garbage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from data_loader import DatasetError, build_gcd_datasets
from utils.distributed import barrier, cleanup, get_rank, init_distributed, is_primary

OPENED: list = []
_REAL_OPEN = Image.open


def _counting_open(fp, *args, **kwargs):
    OPENED.append(fp)
    return _REAL_OPEN(fp, *args, **kwargs)


def _build(root: str):
    OPENED.clear()
    return build_gcd_datasets("identity_folders", root, image_size=16, num_known=2)


def main(root: str, out_dir: str, bad: str) -> int:
    init_distributed("cpu", timeout_s=60)
    Image.open = _counting_open
    ds = _build(root)
    result = {
        "labelled_mask": ds.labelled_mask,
        "train_labels": ds.train_labels,
        "test_labels": ds.test_labels,
        "train_order": torch.from_numpy(ds.train.uq_idx),
        "unlabelled_order": torch.from_numpy(ds.unlabelled_eval.uq_idx),
        "train_paths": [ds.train_eval.source.describe(i) for i in range(len(ds.train_eval))],
        "class_names": ds.class_names,
        "num_known": ds.num_known,
        "opened": len(OPENED),
    }
    barrier()  # every rank has read the record before rank 0 changes the tree
    if is_primary():
        Path(bad).write_bytes(b"not an image")
    barrier()
    try:
        _build(root)
        result["error"] = ""
    except DatasetError as err:
        result["error"] = str(err)
    result["opened_second"] = len(OPENED)
    torch.save(result, Path(out_dir) / f"rank{get_rank()}.pt")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
