"""Checkpoint and optimiser state of a model whose class centres are sharded over the ranks (``PartialFC``).

Both margin-softmax recognition and FaceCoresetNet train a Partial FC classifier: each rank holds a block of the
centres, and a checkpoint holds them all, gathered to rank 0 in class blocks, so that a run resumes on any number of
processes. :class:`ShardedCentresState` gives a :class:`~model.meta_arch.MetaArch` the four state hooks that do this.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from model.partial_fc import PartialFC
from utils.checkpoint import CheckpointError

CENTRES_KEY = "partial_fc.weight"


class ShardedCentresState:
    """Mixin (before ``MetaArch``) for a model with a ``partial_fc`` (:class:`PartialFC`) and a ``cfg`` holding
    ``num_classes`` and ``embedding_size``.

    ``frozen_prefixes`` names submodules whose weights are not the model's to save (FaceCoresetNet's frozen
    recognizer, recorded by its configuration instead).
    """

    partial_fc: PartialFC
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()

    def _is_frozen(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.frozen_prefixes)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights with the full (num_classes, D) centre matrix; a collective under several processes.

        The centres are gathered to rank 0 on the CPU in class blocks (``PartialFC.gather_classes``); the state of
        the other ranks lacks ``partial_fc.weight`` (only rank 0 saves). Frozen submodules are left out.
        """
        state = {k: v for k, v in self.state_dict().items() if not self._is_frozen(k)}
        full = self.partial_fc.full_weight()
        if full is None:
            del state[CENTRES_KEY]
        else:
            state[CENTRES_KEY] = full
        return state

    def load_checkpoint_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load :meth:`checkpoint_state_dict` output (any world size); this rank keeps its block of the centres."""
        state = dict(state_dict)
        full = state.pop(CENTRES_KEY, None)
        expected = (self.cfg.num_classes, self.cfg.embedding_size)
        if full is None or tuple(full.shape) != expected:
            got = None if full is None else tuple(full.shape)
            raise CheckpointError(f"checkpoint centres have shape {got}; the model needs {expected}")
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k != CENTRES_KEY and not self._is_frozen(k)]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint does not fit the model: missing {missing}, unexpected {list(result.unexpected_keys)}"
            )
        self.partial_fc.load_full_weight(full)

    def _centre_state_index(self, optimizer: torch.optim.Optimizer) -> int | None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        matches = [i for i, p in enumerate(params) if p is self.partial_fc.weight]
        return matches[0] if matches else None

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimiser state with the centres' per-class tensors (e.g. momentum) gathered to all classes, on rank 0
        (collective; as :meth:`checkpoint_state_dict`, the other ranks' state lacks those tensors)."""
        state = optimizer.state_dict()
        index = self._centre_state_index(optimizer)
        if index is not None and index in state["state"]:
            state["state"][index] = _gather_per_class(self.partial_fc, state["state"][index])
        return state

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load :meth:`optimizer_state_dict` output, keeping this rank's block of the per-class tensors."""
        state = {**state, "state": dict(state["state"])}
        index = self._centre_state_index(optimizer)
        if index is not None and index in state["state"]:
            state["state"][index] = {
                k: self.partial_fc.shard_classes(v) if _per_class(v, self.cfg.num_classes) else v
                for k, v in state["state"][index].items()
            }
        optimizer.load_state_dict(state)


def _per_class(value: Any, rows: int) -> bool:
    return torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == rows


def _gather_per_class(partial_fc: PartialFC, param_state: dict[str, Any]) -> dict[str, Any]:
    """A centre parameter's optimiser state with its per-class tensors gathered on rank 0 (dropped elsewhere)."""
    out = {}
    for key, value in param_state.items():
        if not _per_class(value, partial_fc.num_local):
            out[key] = value
        elif (full := partial_fc.gather_classes(value)) is not None:
            out[key] = full
    return out
