"""Distributed helpers that also work without a process group (world size 1).

References: DINOv2 ``dinov2/distributed/__init__.py``, timm ``timm/utils/distributed.py``.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_enabled() else 1


def is_primary() -> bool:
    """True on the process that logs and writes files."""
    return get_rank() == 0


def contiguous_shard(n: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """The part of a length-``n`` set that this rank holds: contiguous, nearly equal blocks in rank order.

    Contiguous blocks keep the rank-major concatenation equal to the original order, which makes a distributed run
    reproduce the single-process one (k-means rows, Partial FC class centres).

    Args:
        n: number of rows.
        rank: this rank (default: the process group's).
        world_size: number of ranks (default: the process group's).

    Returns:
        ``slice(start, stop)`` of this rank's rows.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set ``RANK`` and ``WORLD_SIZE``."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> torch.device:
    """Initialise torch.distributed from the torchrun environment and return this process's device.

    Args:
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available).
        timeout_s: collective timeout in seconds.

    Returns:
        The device this rank computes on. The backend is nccl on CUDA and gloo on CPU; a plain
        ``python script.py`` (no torchrun environment) runs as world size 1 without a process group.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but CUDA is not available on this machine")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_enabled():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        logger.info("initialised %s process group: rank %d of %d", backend, get_rank(), get_world_size())
    return dev


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_enabled():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group)."""
    if is_enabled():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce; returns the tensor (unchanged without a process group)."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; returns the tensor."""
    if is_enabled() and get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_variable(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Gather tensors whose first dimension differs between ranks.

    Args:
        tensor: (n_r, ...) on this rank; trailing dimensions and dtype must agree across ranks.

    Returns:
        The list of every rank's tensor, in rank order (``[tensor]`` without a process group).
    """
    world = get_world_size()
    if world == 1:
        return [tensor]
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:n] for g, n in zip(gathered, counts)]


_host_group: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None  # (the default group it serves, gloo group)


def _host_process_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for host-side integers: the default group when it is gloo, else a gloo group
    created on first use (a collective: every rank reaches it at the same call)."""
    global _host_group
    if dist.get_backend() == dist.Backend.GLOO:
        return None
    if _host_group is None or _host_group[0] is not dist.group.WORLD:
        _host_group = (dist.group.WORLD, dist.new_group(backend=dist.Backend.GLOO))
    return _host_group[1]


def all_gather_ints(value: int) -> list[int]:
    """Every rank's integer, in rank order, exchanged over gloo on the host (collective).

    Host values need no device round trip: under NCCL the exchange goes through a gloo group, so it neither waits for
    the device nor makes the device wait.

    Args:
        value: this rank's integer (e.g. its batch size).

    Returns:
        The list of every rank's value (``[value]`` without a process group).
    """
    world = get_world_size()
    if world == 1:
        return [int(value)]
    values = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(values, torch.tensor([int(value)], dtype=torch.int64), group=_host_process_group())
    return [int(v) for v in values]


def gather_shards_to_primary(shard: torch.Tensor, total_rows: int, block_rows: int) -> torch.Tensor | None:
    """Concatenate every rank's ``contiguous_shard(total_rows)`` rows into one CPU tensor on rank 0, in blocks
    (collective).

    The rows travel in rounds: in each, every rank sends the next c = max(1, block_rows // W) rows of its shard
    (zero-padded to c) to rank 0 with ``dist.gather``, and rank 0 copies them into the CPU result. Rank 0 therefore
    holds the result plus W c <= max(block_rows, W) rows of receive buffers on ``shard``'s device; every other rank
    holds at most one padded chunk of c rows beyond its shard. The tensors travel on ``shard``'s device (CPU for gloo,
    CUDA for NCCL).

    Args:
        shard: this rank's (len(contiguous_shard(total_rows)), ...) rows; trailing shape and dtype agree across ranks.
        total_rows: rows of all ranks together.
        block_rows: rows rank 0 receives per round (>= 1).

    Returns:
        The (total_rows, ...) CPU tensor in rank order on rank 0; None on the other ranks.
    """
    world, rank = get_world_size(), get_rank()
    mine = contiguous_shard(total_rows, rank, world)
    if shard.shape[0] != mine.stop - mine.start or block_rows < 1:
        raise ValueError(
            f"gather_shards_to_primary: rank {rank} must pass its {mine.stop - mine.start} rows of {total_rows} and "
            f"block_rows >= 1; got a tensor of shape {tuple(shard.shape)} and block_rows={block_rows}"
        )
    shard = shard.detach()
    if world == 1:
        return shard.to("cpu", copy=True)
    chunk = max(1, block_rows // world)
    shards = [contiguous_shard(total_rows, r, world) for r in range(world)]
    rounds = -(-max(s.stop - s.start for s in shards) // chunk)
    out, received = None, None
    if rank == 0:
        out = torch.empty((total_rows, *shard.shape[1:]), dtype=shard.dtype)
        received = [shard.new_empty((chunk, *shard.shape[1:])) for _ in range(world)]
    for step in range(rounds):
        piece = shard[step * chunk : (step + 1) * chunk]
        if piece.shape[0] < chunk:
            padded = shard.new_zeros((chunk, *shard.shape[1:]))
            padded[: piece.shape[0]] = piece
            piece = padded
        dist.gather(piece.contiguous(), gather_list=received, dst=0)
        if rank == 0:
            for r, block in enumerate(received):
                start = shards[r].start + step * chunk
                rows = min(chunk, shards[r].stop - start)
                if rows > 0:
                    out[start : start + rows].copy_(block[:rows])
    return out
