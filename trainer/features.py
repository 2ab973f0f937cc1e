"""Sharded, index-keyed feature extraction shared by validation, extract_features.py and SSK.py.

Every rank embeds a strided shard of the dataset (no padding, no duplicates; ``utils.sharding``); the rows are
gathered and sorted by ``uq_idx``, so neither the sharding nor the loader order can corrupt the result.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from utils.distributed import is_primary
from utils.sharding import gather_rows_by_index, strided_shard

logger = logging.getLogger(__name__)


@dataclass
class Features:
    """Embeddings of one split, rows in the order the caller asked for.

    Attributes:
        features: (N, D) float32, L2-normalised.
        labels: (N,) int64 class labels.
        uq_idx: (N,) int64 sample indices in the split's listing.
    """

    features: torch.Tensor
    labels: torch.Tensor
    uq_idx: torch.Tensor


@torch.inference_mode()
def embed_dataset(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
    gather: bool = True,
    desc: str = "extract",
) -> Features:
    """Embed ``dataset`` (items ``(image, label, uq_idx)``) sharded over ranks.

    Args:
        embed_fn: maps a (B, 3, S, S) batch to (B, D) features.
        dataset: evaluation dataset with items ``(image, label, uq_idx)``.
        device: where the model runs.
        batch_size: images per forward.
        num_workers: DataLoader workers.
        autocast: optional autocast context manager factory result, re-entered per batch.
        gather: True gathers every rank's rows and returns the whole split ordered by ``uq_idx``; False returns
            this rank's shard only (rows in shard order).
        desc: progress-bar label.

    Returns:
        ``Features`` with float32 features.
    """
    shard = Subset(dataset, strided_shard(len(dataset)))
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    feats, labels, indices = [], [], []
    for images, label, uq_idx in tqdm(loader, desc=desc, disable=not is_primary(), leave=False):
        with autocast if autocast is not None else contextlib.nullcontext():
            out = embed_fn(images.to(device, non_blocking=True))
        feats.append(out.float())
        labels.append(torch.as_tensor(label, dtype=torch.long))
        indices.append(torch.as_tensor(uq_idx, dtype=torch.long))
    dim = feats[0].shape[1] if feats else _probe_dim(embed_fn, dataset, device)
    local = Features(
        features=torch.cat(feats) if feats else torch.zeros(0, dim, device=device),
        labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        uq_idx=torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
    )
    if not gather:
        return local
    return _gather_by_index(local, device)


def _probe_dim(embed_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, device: torch.device) -> int:
    """Feature width for a rank whose shard is empty (more ranks than samples)."""
    image = dataset[0][0].unsqueeze(0).to(device)
    return int(embed_fn(image).shape[1])


def _gather_by_index(local: Features, device: torch.device) -> Features:
    """All-gather every rank's rows and return them sorted by ``uq_idx``; overlapping shards are an error."""
    uq_idx, (feats, labels) = gather_rows_by_index(local.uq_idx, [local.features, local.labels], device)
    return Features(features=feats, labels=labels, uq_idx=uq_idx)
