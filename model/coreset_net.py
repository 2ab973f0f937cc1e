"""FaceCoresetNet as a training method: a frozen recognizer, the template aggregator, an AdaFace head.

The recognizer (a ``--method recognition`` checkpoint; its embedding norm should carry quality, as AdaFace's does) is
frozen and always in eval mode; it is neither trained nor saved with the aggregator: the checkpoint's configuration
records its file, SHA-256, architecture, input size, preset and embedding size, and loading checks them. The
aggregator (``model.coreset.CoresetAggregator``) pools each template; its unnormalised output a = unit * |a| goes to
Partial FC with the AdaFace head, which takes the quality from |a|. Only the aggregator is data parallel (DDP); the
class centres are model parallel as in the recognition method.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from model.centre_state import ShardedCentresState
from model.coreset import DEFAULT_CORE_SIZE, GAMMA_INIT, CoresetAggregator
from model.margin_heads import build_margin_head
from model.meta_arch import MetaArch, MethodConfig
from model.partial_fc import PartialFC
from model.recognition import FaceRecognizer, recognizer_from_checkpoint
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.distributed import get_world_size

logger = logging.getLogger(__name__)

METHOD = "coreset"
# The paper's AdaFace head for the aggregator (train.sh; scripts/run.sh differs): s 48, m 0.8, h 0.333.
HEAD_ARGS = {"s": 48.0, "m": 0.8, "h": 0.333}
RECOGNIZER_FIELDS = ("arch", "img_size", "embedding_size", "input_preset")


@dataclass
class CoresetConfig(MethodConfig):
    """Everything that defines an aggregator run (stored in its checkpoints as ``model_config``).

    Attributes:
        img_size: the recognizer's input side (the images the templates hold).
        embedding_size: D, the recognizer's embedding size (the attention's width).
        core_size: K.
        heads: attention heads.
        dropout: attention dropout.
        gamma_init: initial gamma.
        num_classes: identities of the AdaFace head.
        head_args: the AdaFace head's arguments.
        max_template_size: largest simulated template.
        max_clip_length: longest simulated clip.
        cache_augmentations: views per image in the embedding cache (0: embed augmented images every step).
        recognizer: the frozen recognizer: ``path``, ``sha256`` and its ``RECOGNIZER_FIELDS``.
    """

    method: ClassVar[str] = METHOD
    img_size: int = 112
    embedding_size: int = 512
    core_size: int = DEFAULT_CORE_SIZE
    heads: int = 8
    dropout: float = 0.1
    gamma_init: float = GAMMA_INIT
    num_classes: int = 0
    head_args: dict[str, float] = field(default_factory=lambda: dict(HEAD_ARGS))
    max_template_size: int = 20
    max_clip_length: int = 3
    cache_augmentations: int = 0
    recognizer: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_recognizer(
    path: str | Path, *, weights_only: bool = True, expected: dict[str, Any] | None = None
) -> tuple[FaceRecognizer, dict[str, Any]]:
    """A frozen recognizer from its training checkpoint, and its identity (path, sha256, ``RECOGNIZER_FIELDS``).

    Args:
        path: a ``--method recognition`` checkpoint.
        weights_only: safe loading.
        expected: the identity an aggregator checkpoint recorded; any difference is an error.

    Raises:
        CheckpointError: the file is missing, not a recognition checkpoint, or not the recorded recognizer.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"recognizer checkpoint {path} does not exist (expected a --method recognition run)")
    ckpt = load_checkpoint(path, weights_only=weights_only)
    model = recognizer_from_checkpoint(ckpt, path)
    identity = {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "arch": model.cfg.arch,
        "img_size": int(model.cfg.img_size),
        "embedding_size": int(model.cfg.embedding_size),
        "input_preset": (ckpt.get("data_config") or {}).get("input_preset", "gcd"),
        "head": model.cfg.head,
    }
    if expected:
        differ = [
            f"{k} {identity[k]} (recorded: {expected[k]})"
            for k in (*RECOGNIZER_FIELDS, "sha256")
            if k in expected and identity[k] != expected[k]
        ]
        if differ:
            raise CheckpointError(
                f"recognizer {path} does not match the one the aggregator was trained on: {'; '.join(differ)}"
            )
    if identity["head"] != "adaface":
        logger.warning(
            "recognizer %s was trained with --head %s: its embedding norm may not carry quality", path, identity["head"]
        )
    model.requires_grad_(False)
    return model.eval(), identity


class CoresetNet(ShardedCentresState, MetaArch):
    """Frozen recognizer + ``CoresetAggregator`` + Partial FC with the AdaFace head.

    Args:
        cfg: the configuration (``num_classes`` >= 2).
        recognizer: the frozen recognizer whose identity ``cfg.recognizer`` records.
    """

    summary_scalars: ClassVar[tuple[str, ...]] = ("gamma",)
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("recognizer.",)

    def __init__(self, cfg: CoresetConfig, recognizer: FaceRecognizer) -> None:
        super().__init__()
        if cfg.num_classes < 2:
            raise ValueError(f"the aggregator's head needs at least 2 identities, got {cfg.num_classes}")
        if recognizer.cfg.embedding_size != cfg.embedding_size:
            raise ValueError(
                f"the recognizer embeds into {recognizer.cfg.embedding_size} dimensions; the aggregator expects "
                f"{cfg.embedding_size}"
            )
        self.cfg = cfg
        self.recognizer = recognizer.requires_grad_(False).eval()
        self.aggregator = CoresetAggregator(
            cfg.embedding_size, cfg.core_size, heads=cfg.heads, dropout=cfg.dropout, gamma_init=cfg.gamma_init
        )
        self.partial_fc = PartialFC(cfg.embedding_size, cfg.num_classes, build_margin_head("adaface", **cfg.head_args))
        self._ddp_aggregator: list[DistributedDataParallel] = []

    def train(self, mode: bool = True) -> CoresetNet:
        """Train or evaluate the aggregator and head; the recognizer stays in eval mode."""
        super().train(mode)
        self.recognizer.eval()
        return self

    # ------------------------------------------------------------------ embedding and pooling
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The recognizer's unnormalised image embeddings (verification pools them; :meth:`aggregate_templates` too)."""
        return self.recognizer.forward_features(images)

    @torch.no_grad()
    def aggregate_templates(self, units: torch.Tensor, norms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit template features (B, D) of padded templates (evaluation: exact argmax picks, no dropout)."""
        was_training = self.aggregator.training
        self.aggregator.eval()
        unit, _ = self.aggregator(units, norms, mask)
        self.aggregator.train(was_training)
        return unit

    def _embed_frames(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) cached embeddings as they are, or (B, N, 3, S, S) images embedded by the recognizer."""
        if frames.ndim == 3:
            return frames.float()
        out = frames.new_zeros(*mask.shape, self.cfg.embedding_size, dtype=torch.float32)
        with torch.no_grad():
            out[mask] = self.recognizer.forward_features(frames[mask]).float()
        return out

    def _gumbel(self, seeds: torch.Tensor, picks: int, width: int, device: torch.device) -> torch.Tensor:
        """(B, K', N) Gumbel noise, each template's drawn from its own seed at the full template width (so it does
        not depend on the batch it lands in)."""
        rows = []
        for seed in seeds.tolist():
            generator = torch.Generator().manual_seed(int(seed))
            uniform = torch.rand(self.cfg.core_size, self.cfg.max_template_size, generator=generator)
            rows.append(uniform[:picks, :width])
        uniform = torch.stack(rows).clamp_(1e-10, 1.0 - 1e-7)
        return (-torch.log(-torch.log(uniform))).to(device)

    # ------------------------------------------------------------------ training
    def batch_inputs(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(frames, mask, labels, seeds)``: all on ``device`` except the seeds (read on the host)."""
        frames, mask, labels, seeds = batch
        return frames.to(device, non_blocking=True), mask.to(device), labels.to(device), seeds

    def prepare_for_distributed_training(self, device: torch.device, broadcast_buffers: bool = True) -> nn.Module:
        """Wrap the aggregator in DDP (unused parameters allowed: gamma has no gradient when every template of a
        batch has one image); the class centres are model parallel. Returns this module."""
        if get_world_size() > 1 and not self._ddp_aggregator:
            device_ids = [device.index] if device.type == "cuda" else None
            self._ddp_aggregator.append(
                DistributedDataParallel(
                    self.aggregator,
                    device_ids=device_ids,
                    broadcast_buffers=broadcast_buffers,
                    find_unused_parameters=True,
                )
            )
        return self

    def no_sync(self) -> ContextManager:
        """DDP ``no_sync`` of the aggregator."""
        return self._ddp_aggregator[0].no_sync() if self._ddp_aggregator else contextlib.nullcontext()

    def forward(
        self, frames: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Training step: embed (or take cached embeddings), aggregate, AdaFace over Partial FC.

        Args:
            frames: (B, N, 3, S, S) images or (B, N, D) cached embeddings, padded.
            mask: (B, N) bool, True for real frames.
            labels: (B,) identities.
            seeds: (B,) int64 seeds of each template's Gumbel noise.

        Returns:
            The Partial FC outputs with ``loss``, and ``gamma``.
        """
        width = int(mask.sum(1).max())
        frames, mask = frames[:, :width], mask[:, :width]
        embeddings = self._embed_frames(frames, mask)
        norms = embeddings.norm(dim=-1)
        units = embeddings / norms.clamp_min(1e-6)[..., None]
        gumbel = None
        if self.training:
            gumbel = self._gumbel(seeds, min(self.cfg.core_size, width), width, embeddings.device)
        aggregator = self._ddp_aggregator[0] if self._ddp_aggregator else self.aggregator
        unit, norm = aggregator(units, norms, mask, gumbel)
        pooled = unit * norm
        if self._ddp_aggregator and pooled.requires_grad:
            world = get_world_size()
            pooled.register_hook(lambda grad: grad * world)  # DDP averages; Partial FC already gives the global mean
        out = self.partial_fc(pooled, labels)
        out["gamma"] = self.aggregator.gamma.detach()
        return out

    def clip_parameters(self) -> list[nn.Parameter]:
        """The aggregator's parameters (the centres are left out: each rank holds its own block of them)."""
        return list(self.aggregator.parameters())

    def get_params_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """gamma alone without weight decay (the release's group 1); every other trainable parameter (aggregator and
        class centres, 1-D ones included, as released) with ``weight_decay``."""
        rest = [p for n, p in self.named_parameters() if p.requires_grad and p is not self.aggregator.gamma]
        return [
            {"params": [self.aggregator.gamma], "weight_decay": 0.0, "name": "gamma"},
            {"params": rest, "weight_decay": weight_decay, "name": "decay"},
        ]


def coreset_from_checkpoint(
    ckpt: dict[str, Any], source: str | Path, *, weights_only: bool = True, recognizer_path: str | Path | None = None
) -> CoresetNet:
    """Rebuild an aggregator run from its checkpoint dict, with its recorded recognizer (checked), on the CPU.

    Args:
        ckpt: the checkpoint dict.
        source: its file (messages).
        weights_only: safe loading of the recognizer.
        recognizer_path: the recognizer's file when it moved (default: the recorded path); it must be the same file.

    Raises:
        CheckpointError: not an aggregator checkpoint, a missing or different recognizer, or weights that do not fit.
    """
    stored = ckpt.get("model_config")
    if not isinstance(stored, dict) or stored.get("method") != METHOD:
        raise CheckpointError(f"{source} is not an aggregator checkpoint (no model_config with method {METHOD})")
    cfg = CoresetConfig.from_dict(stored)
    path = recognizer_path or cfg.recognizer.get("path")
    if not path:
        raise CheckpointError(f"{source} records no recognizer")
    try:
        recognizer, _ = load_recognizer(path, weights_only=weights_only, expected=cfg.recognizer)
        model = CoresetNet(cfg, recognizer)
        model.load_checkpoint_state_dict(ckpt["state_dict"])
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err
    return model
