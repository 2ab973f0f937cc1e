"""Training samplers: balanced labelled/unlabelled (FaceGCD, docs/method.md, section 4) and plain shuffling.

``BalancedSampler``: weighted sampling with replacement over D_L ++ D_U: weight 1 per labelled item and |D_L|/|D_U|
per unlabelled item, so half of each batch is labelled in expectation, with |D_L| + |D_U| draws per epoch.
``ShuffleSampler``: one shared permutation per epoch, strided over the ranks.

- ``mode="distributed"`` (default): one global stream per epoch from a generator seeded with (seed, epoch),
  identical on all ranks; rank r takes positions r, r+W, r+2W, ... of it, truncated to floor(len/W) per rank, so
  one epoch is one pass over the data across all ranks and every rank runs the same number of steps.
- ``mode="reference"``: each rank draws a full epoch from its own stream seeded with (seed + rank, epoch), as the
  reference's non-distributed ``WeightedRandomSampler`` did (W times the updates per epoch).

References: PyTorch ``WeightedRandomSampler`` and ``DistributedSampler``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from utils.distributed import get_rank, get_world_size

logger = logging.getLogger(__name__)

MODES = ("distributed", "reference")
_EPOCH_STRIDE = 100_003


class BalancedSampler(Sampler[int]):
    """Draws indices of the merged training set so that labelled and unlabelled items are equally likely.

    Args:
        is_labelled: per-item flag of the merged training set (True = in D_L).
        seed: base seed; the stream of an epoch depends on (seed, epoch) only (and the rank in reference mode).
        num_replicas: world size W (default ``utils.distributed.get_world_size()``).
        rank: this process's rank (default ``utils.distributed.get_rank()``).
        mode: ``"distributed"`` or ``"reference"`` (see the module docstring).
    """

    def __init__(
        self,
        is_labelled: Sequence[bool] | torch.Tensor,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        mode: str = "distributed",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"sampler mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
        self.is_labelled = torch.as_tensor(is_labelled, dtype=torch.bool).flatten()
        self.total = len(self.is_labelled)
        if self.total == 0:
            raise ValueError("BalancedSampler needs a non-empty training set")
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not valid for num_replicas {self.num_replicas}")
        if mode == "distributed" and self.total < self.num_replicas:
            raise ValueError(f"{self.total} training items cannot be shared by {self.num_replicas} ranks")
        self.seed = int(seed)
        self.mode = mode
        self.epoch = 0
        self.weights = self._weights()

    def _weights(self) -> torch.Tensor:
        n_labelled = int(self.is_labelled.sum())
        n_unlabelled = self.total - n_labelled
        if n_labelled == 0 or n_unlabelled == 0:
            logger.warning(
                "training set has %d labelled and %d unlabelled items; sampling uniformly", n_labelled, n_unlabelled
            )
            return torch.ones(self.total, dtype=torch.float64)
        weights = torch.full((self.total,), n_labelled / n_unlabelled, dtype=torch.float64)
        weights[self.is_labelled] = 1.0
        return weights

    def _stream_seed(self) -> int:
        base = self.seed + self.rank if self.mode == "reference" else self.seed
        return (base * _EPOCH_STRIDE + self.epoch) % (2**63)

    def __len__(self) -> int:
        return self.total if self.mode == "reference" else self.total // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self._stream_seed())
        stream = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        if self.mode == "distributed":
            stream = stream[: len(self) * self.num_replicas][self.rank :: self.num_replicas]
        return iter(stream.tolist())

    def set_epoch(self, epoch: int) -> None:
        """Select the stream of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int | str]:
        """Returns: the state needed to resume (epoch, seed, mode)."""
        return {"epoch": self.epoch, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``epoch`` and ``seed`` saved by :meth:`state_dict`."""
        if state.get("mode", self.mode) != self.mode:
            logger.warning("resuming sampler saved in mode %s with mode %s", state["mode"], self.mode)
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])


class ShuffleSampler(Sampler[int]):
    """One permutation of the whole set per epoch, shared by the ranks: rank r takes positions r, r+W, ...

    The permutation depends on (seed, epoch) only, so a resumed run draws the same batches; every rank gets
    floor(n / W) items, so all ranks run the same number of steps (the recognition loader).

    Args:
        num_items: size of the training set.
        seed: base seed.
        num_replicas: world size W (default ``utils.distributed.get_world_size()``).
        rank: this process's rank (default ``utils.distributed.get_rank()``).
    """

    def __init__(self, num_items: int, *, seed: int = 0, num_replicas: int | None = None, rank: int | None = None):
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not valid for num_replicas {self.num_replicas}")
        if num_items < self.num_replicas:
            raise ValueError(f"{num_items} training items cannot be shared by {self.num_replicas} ranks")
        self.total = int(num_items)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.total // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed((self.seed * _EPOCH_STRIDE + self.epoch) % (2**63))
        order = torch.randperm(self.total, generator=generator)[: len(self) * self.num_replicas]
        return iter(order[self.rank :: self.num_replicas].tolist())

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """Returns: the state needed to resume (epoch, seed)."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
