"""What the one training loop and the evaluation scripts ask of a method (DINOv2's ``SSLMetaArch`` pattern).

A method (FaceGCD, margin-softmax recognition, DINO, ...) is an ``nn.Module`` that owns its parts and losses. The loop
(``trainer/loop.py``, ``trainer/engine.py``) and the scripts (extraction, SSK, verification) call only what this class
declares, so checkpoints, resume, precision, distribution and logging exist once. The defaults fit a method whose
parameters are all replicated (data parallel); a method with model-parallel parts (Partial FC) overrides the state and
distribution hooks. The registry entry that builds a method lives in ``trainer/methods/`` (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, ContextManager

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from utils.checkpoint import CheckpointError
from utils.distributed import get_world_size


class MethodConfig:
    """Base of a method's dataclass configuration (stored in checkpoints as ``model_config``)."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain-type copy with ``method`` naming the method (loads with ``weights_only=True``)."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> MethodConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        values = {k: v for k, v in stored.items() if k != "method"}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{cls.method} model_config has unknown fields {unknown}")
        return cls(**values)


class MetaArch(nn.Module):
    """Base of the training methods; see the module docstring.

    Attributes:
        summary_scalars: names of ``forward``'s scalars that also go to ``summary.csv`` as ``train_<name>``
            (epoch means), e.g. DINO's teacher entropy.
        counted_scalars: names of ``forward``'s scalars that are summed over the epoch instead of averaged
            (per-batch counts, e.g. FaceGCD's batches without a labelled sample).
    """

    summary_scalars: ClassVar[tuple[str, ...]] = ()
    counted_scalars: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ embedding (extraction, SSK, verification)
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation embedding of a normalised image batch (B, 3, S, S) -> (B, D), not normalised (verification
        pools templates with it)."""
        raise NotImplementedError

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The features extraction and clustering use: :meth:`forward_features`, L2-normalised, float32."""
        return nn.functional.normalize(self.forward_features(images).float(), dim=-1)

    # ------------------------------------------------------------------ training
    @property
    def views_per_sample(self) -> int:
        """Images the forward sees per dataset sample (throughput: FaceGCD 2 views, DINO 2 + local crops)."""
        return 1

    def get_params_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: ``weight_decay`` on trainable >= 2-D tensors, none on 1-D ones (biases, norms)
        or those named by a ``no_weight_decay()`` method."""
        skip = set(getattr(self, "no_weight_decay", set)())
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Per-block activation checkpointing (``--grad-checkpointing``)."""
        raise ValueError(f"--grad-checkpointing: {type(self).__name__} has no activation checkpointing")

    def batch_inputs(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The loader's batch as the positional inputs of ``forward`` (the first one is the image batch)."""
        raise NotImplementedError

    def prepare_for_distributed_training(self, device: torch.device, broadcast_buffers: bool = True) -> nn.Module:
        """The module the loop calls each step: DDP around the whole method when several processes run."""
        if get_world_size() == 1:
            return self
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(self, device_ids=device_ids, broadcast_buffers=broadcast_buffers)

    def begin_epoch(self, epoch: int) -> None:
        """Called before each training epoch (epoch-dependent losses: temperatures, regularisation weights)."""

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        """Called after backward (and clipping), before each optimiser step.

        Args:
            optimizer: the optimiser about to step (per-step schedules such as weight decay).
            progress: training progress in epochs, ``epoch + step / steps_per_epoch``.
        """

    def clip_parameters(self) -> list[nn.Parameter]:
        """The parameters ``--clip-grad`` clips together (one norm): all trainable ones by default."""
        return [p for p in self.parameters() if p.requires_grad]

    def clip_gradients(self, clip: float) -> None:
        """Clip the (unscaled) gradients of :meth:`clip_parameters` to one norm of at most ``clip``."""
        torch.nn.utils.clip_grad_norm_(self.clip_parameters(), clip)

    def end_epoch(self, epoch: int, stats: dict[str, float]) -> None:
        """Called with an epoch's training statistics (all ranks), e.g. to log what a method counts."""

    def export(self, out_dir: Path, epoch: int, args: dict[str, Any]) -> None:
        """Write method-specific files after each epoch's checkpoint (primary rank); nothing by default."""

    def after_optimizer_step(self, progress: float) -> None:
        """Called after each optimiser step (e.g. an EMA teacher update); ``progress`` as above."""

    def no_sync(self) -> ContextManager:
        """Skip gradient synchronisation (gradient accumulation); a no-op unless a method wraps parts in DDP."""
        return contextlib.nullcontext()

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to save. A collective for model-parallel methods: call it on every rank; their result may be
        complete on the primary rank only (the one that saves), e.g. without the full class centres elsewhere."""
        return self.state_dict()

    def load_checkpoint_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`checkpoint_state_dict` saved (any world size)."""
        self.load_state_dict(state_dict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimiser state to save. A collective for model-parallel methods (call it on every rank), whose result
        may be complete on the primary rank only, as :meth:`checkpoint_state_dict`."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what :meth:`optimizer_state_dict` saved."""
        optimizer.load_state_dict(state)
