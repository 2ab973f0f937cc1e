"""torchrun worker for tests/utils/test_ijb.py: IJB embedding sharded over 2 ranks, results saved by rank 0.

    python -m torch.distributed.run --nproc_per_node=2 tests/utils/_ijb_dist_worker.py ROOT OUT.pt

ROOT is a folder written by ``write_scored_ijb``. Every rank calls ``embed_ijb_faces`` and ``evaluate_ijb`` (both rules,
one loader worker each); rank 0 saves ``{"embeddings", "flips", "world_size", "tars": {rule: {far: tar}},
"exact_roc": {rule: bool}}``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.distributed import cleanup, get_world_size, init_distributed, is_primary
from utils.evaluation.ijb import embed_ijb_faces, evaluate_ijb, load_ijb_meta, meta_paths
from utils.face_align import ARCFACE_TEMPLATE_112

FARS = (0.1, 0.3, 0.5, 0.9)
_CENTRE = 56
_RADIUS = 100


def pixel_vector_embed(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 112, 112) uint8 -> (B, 2): the centre pixel's red and green values minus 128."""
    return images[:, :2, _CENTRE, _CENTRE].float() - 128.0


def write_scored_ijb(root: Path, scores: Sequence[float], labels: Sequence[int]) -> None:
    """An IJB-B folder whose N1D1F1 pair scores rank as ``scores`` under ``pixel_vector_embed``.

    Template 1 is a probe face whose vector points along x; template k + 2 is one face whose vector makes the angle
    acos(scores[k]) with x (pixel values rounded, so the cosines keep the order of ``scores``); pair k is
    (1, k + 2) with ``labels[k]``. Faces are uniform 112 x 112 PNGs with the template's landmarks, so the aligned crop
    keeps the colour.
    """
    angles = [0.0] + [math.acos(s) for s in scores]
    crops = root / "loose_crop"
    crops.mkdir(parents=True)
    faces, marks = [], []
    points = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE_112.ravel())
    for face, angle in enumerate(angles):
        colour = (128 + round(_RADIUS * math.cos(angle)), 128 + round(_RADIUS * math.sin(angle)), 0)
        Image.fromarray(np.full((112, 112, 3), colour, dtype=np.uint8)).save(crops / f"{face}.png")
        faces.append(f"{face}.png {face + 1} {face + 1}\n")
        marks.append(f"{face}.png {points} 1.0\n")
    paths = meta_paths(root, "ijbb")
    paths["faces"].parent.mkdir()
    paths["faces"].write_text("".join(faces))
    paths["landmarks"].write_text("".join(marks))
    paths["pairs"].write_text("".join(f"1 {k + 2} {label}\n" for k, label in enumerate(labels)))


def main(root: str, out_path: str) -> int:
    init_distributed("cpu")
    meta = load_ijb_meta(root, "ijbb")
    embeddings, flips = embed_ijb_faces(meta, pixel_vector_embed, batch_size=2, workers=1, progress=False)
    tars, exact = {}, {}
    for rule, exact_roc in (("insightface", False), ("exact", True)):
        result = evaluate_ijb(
            root, "ijbb", pixel_vector_embed, batch_size=2, workers=1, fars=FARS, exact_roc=exact_roc, progress=False
        )
        tars[rule], exact[rule] = result.tar_at_far["N1D1F1"], result.exact_roc
    if is_primary():
        record = {"embeddings": embeddings, "flips": flips, "world_size": get_world_size(), "tars": tars}
        torch.save({**record, "exact_roc": exact}, out_path)
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
