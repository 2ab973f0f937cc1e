"""Strided sharding of a listing over the ranks, and the gather that puts the computed rows back in listing order.

Used by the sharded feature extraction (``trainer/features.py``) and the IJB embedding (``utils/evaluation/ijb.py``):
rank r of W takes indices r, r + W, r + 2W, ... of the listing (no padding, no duplicates), computes one row per
index, and ``gather_rows_by_index`` all-gathers every rank's rows with their indices and sorts them by index. The
result equals one process's whatever the world size, the loader workers or the order in which rows were computed.
Without a process group the shard is the whole listing and the gather only sorts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from utils.distributed import all_gather_variable, get_rank, get_world_size


def strided_shard(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """This rank's indices ``rank, rank + W, ...`` of ``range(n)``: every index on exactly one rank.

    Args:
        n: length of the listing.
        rank: this rank (default: the process group's).
        world_size: number of ranks (default: the process group's).

    Returns:
        The indices, ascending.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(range(rank, n, world_size))


def gather_rows_by_index(
    index: torch.Tensor, rows: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """All-gather every rank's rows and their listing indices, sorted by index (collective: every rank calls it).

    Args:
        index: (n_r,) int64 listing index of each of this rank's rows.
        rows: tensors of n_r rows each (trailing shapes and dtypes equal across ranks).
        device: where the collective runs (CUDA for NCCL, the CPU for Gloo).

    Returns:
        (the sorted indices of all ranks, the rows of each tensor in that order), on the CPU.

    Raises:
        RuntimeError: two ranks sent the same index (overlapping shards).
    """
    for tensor in rows:
        if tensor.shape[0] != index.shape[0]:
            raise ValueError(f"gather_rows_by_index: {index.shape[0]} indices but {tensor.shape[0]} rows")
    gathered_index = _all_rows(index, device)
    gathered = [_all_rows(tensor, device) for tensor in rows]
    order = torch.argsort(gathered_index)
    sorted_index = gathered_index[order]
    if bool((sorted_index[1:] == sorted_index[:-1]).any()):
        raise RuntimeError("sharded rows gathered duplicate listing indices: the shards overlap")
    return sorted_index, [tensor[order] for tensor in gathered]


def _all_rows(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's rows of ``tensor`` in rank order, on the CPU (this rank's alone without a process group)."""
    if get_world_size() == 1:
        return tensor.cpu()
    return torch.cat(all_gather_variable(tensor.to(device))).cpu()
