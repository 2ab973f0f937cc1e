"""Margin-softmax face recognition as a training method: embedding backbone + Partial FC with a margin head.

The backbone (a registered ViT with an embedding neck, or an IResNet) is data parallel: under several processes only
it is wrapped in DDP. The class centres are model parallel (``PartialFC``: each rank holds a contiguous block of the
classes, embeddings and labels are all-gathered), so they are never wrapped. Checkpoints hold the full centre matrix
and the full optimiser state of it (gathered from all ranks), so a run resumes exactly and loads on any world size.
Evaluation features are the L2-normalised embeddings.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from model.backbones import ViTEmbedder, create_embedding_backbone
from model.iresnet import load_arcface_torch_weights
from model.landmark import (
    LANDMARK_EXPORT,
    LandmarkFrontEnd,
    landmark_mosaic,
    landmark_regularisation,
    landmark_regularisation_weight,
    save_landmark_weights,
)
from model.margin_heads import build_margin_head
from model.meta_arch import MetaArch, MethodConfig
from model.partial_fc import PartialFC
from model.vit import load_pretrained_backbone
from utils.checkpoint import CheckpointError
from utils.distributed import get_world_size

logger = logging.getLogger(__name__)

METHOD = "recognition"


@dataclass
class RecognitionConfig(MethodConfig):
    """Everything that defines a recognition model (stored in its checkpoints as ``model_config``).

    Attributes:
        arch: embedding backbone (``model.backbones.list_embedding_backbones``).
        img_size: square input side in pixels.
        patch_size: ViT patch size (unused by IResNets).
        embedding_size: embedding dimension.
        num_classes: identities of the classifier.
        head: margin head name (``model.margin_heads.MARGIN_HEADS``).
        head_args: overrides of the head's defaults (e.g. ``{"s": 64.0, "m2": 0.5}``).
        sample_rate: Partial FC sampling rate r in (0, 1].
        dropout: dropout before the IResNet feature layer.
        landmark_cnn: Part fViT: a trainable landmark CNN turns each image into the mosaic the ViT sees, so the
            (S/p)^2 landmarks are learned under the recognition loss (ViT backbones only).
        landmark_tiles: mosaic tile orientation, "natural" or "reference".
        landmark_regularisation: LAFS fine-tuning: add the MSE between the landmarks of the trained CNN and of a
            frozen copy of its initial weights, weighted by ``model.landmark.landmark_regularisation_weight(epoch)``.
    """

    method: ClassVar[str] = METHOD
    arch: str = "iresnet50"
    img_size: int = 112
    patch_size: int = 8
    embedding_size: int = 512
    num_classes: int = 0
    head: str = "arcface"
    head_args: dict[str, float] = field(default_factory=dict)
    sample_rate: float = 1.0
    dropout: float = 0.0
    landmark_cnn: bool = False
    landmark_tiles: str = "natural"
    landmark_regularisation: bool = False


class FaceRecognizer(MetaArch):
    """Embedding backbone trained with a margin head over Partial FC class centres.

    Args:
        cfg: the model configuration (``num_classes`` >= 1).
    """

    def __init__(self, cfg: RecognitionConfig) -> None:
        super().__init__()
        if cfg.num_classes < 2:
            raise ValueError(f"a recognition model needs at least 2 identities, got {cfg.num_classes}")
        self.cfg = cfg
        self.backbone = create_embedding_backbone(
            cfg.arch,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embedding_size=cfg.embedding_size,
            dropout=cfg.dropout,
        )
        self.front_end: LandmarkFrontEnd | None = None
        if cfg.landmark_cnn:
            if not isinstance(self.backbone, ViTEmbedder):
                raise ValueError(f"--landmark-cnn (Part fViT) needs a ViT backbone; --arch {cfg.arch} is not one")
            self.front_end = LandmarkFrontEnd(
                cfg.img_size, cfg.patch_size, orientation=cfg.landmark_tiles, frozen=False
            )
        elif cfg.landmark_regularisation:
            raise ValueError("--landmark-regularisation needs --landmark-cnn (it regularises the learned landmarks)")
        self.partial_fc = PartialFC(
            cfg.embedding_size, cfg.num_classes, build_margin_head(cfg.head, **cfg.head_args), cfg.sample_rate
        )
        self.epoch = 0
        if cfg.landmark_regularisation:
            self.reference_front_end = LandmarkFrontEnd(
                cfg.img_size, cfg.patch_size, orientation=cfg.landmark_tiles, frozen=True
            )
        # DDP wraps the trainable image path (front end + backbone); kept in a list so it is not a submodule
        self._encoder = [_Encoder(self.front_end, self.backbone)]
        self._ddp_encoder: list[DistributedDataParallel] = []

    # ------------------------------------------------------------------ training
    def batch_inputs(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(image, label, ...)`` items -> ``(images, labels)`` on ``device``."""
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    def prepare_for_distributed_training(self, device: torch.device, broadcast_buffers: bool = True) -> nn.Module:
        """Wrap the image path (backbone, and a trainable landmark CNN) in DDP; the class centres are model
        parallel. Returns this module."""
        if get_world_size() > 1 and not self._ddp_encoder:
            device_ids = [device.index] if device.type == "cuda" else None
            self._ddp_encoder.append(
                DistributedDataParallel(self._encoder[0], device_ids=device_ids, broadcast_buffers=broadcast_buffers)
            )
        return self

    def no_sync(self) -> ContextManager:
        """DDP ``no_sync`` of the image path (the Partial FC gradients are local to each rank anyway)."""
        return self._ddp_encoder[0].no_sync() if self._ddp_encoder else contextlib.nullcontext()

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) -> ((B, embedding_size) embeddings, landmarks or None), through DDP when distributed.

        Partial FC gives each rank's embeddings the gradient of the loss averaged over the global batch, and DDP
        averages the backbone gradients over the W ranks once more; the embedding gradient is scaled by W so the
        backbone gets the gradient of the global mean loss, as with one process (arcface_torch does the same).
        """
        if not self._ddp_encoder:
            return self._encoder[0](images)
        embeddings, coords = self._ddp_encoder[0](images)
        if embeddings.requires_grad:
            world = get_world_size()
            embeddings.register_hook(lambda grad: grad * world)
        return embeddings, coords

    def freeze_reference_landmarks(self) -> None:
        """LAFS: the frozen copy takes the landmark CNN's current weights (call once they are loaded)."""
        if self.cfg.landmark_regularisation:
            self.reference_front_end.cnn.load_state_dict(self.front_end.cnn.state_dict())

    def begin_epoch(self, epoch: int) -> None:
        """The epoch selects the landmark regularisation weight."""
        self.epoch = int(epoch)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step forward: (mosaic,) embeddings, margin logits over the (sampled) centres, the loss.

        Returns:
            The Partial FC outputs, with ``loss`` (plus ``landmark_reg`` under LAFS fine-tuning).
        """
        embeddings, coords = self.embed(images)
        out = self.partial_fc(embeddings, labels)
        if self.cfg.landmark_regularisation:
            reference = self.reference_front_end.landmarks(images)
            regulariser = landmark_regularisation(coords, reference, self.cfg.img_size)
            out["landmark_reg"] = regulariser.detach()
            out["loss"] = out["loss"] + landmark_regularisation_weight(self.epoch) * regulariser
        return out

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings, not normalised (their norm is the quality weight of IJB's N1 pooling)."""
        return self._encoder[0](images)[0]

    def export(self, out_dir: Path, epoch: int, args: dict[str, Any]) -> None:
        """Part fViT: the learned landmark CNN in the reference key format, ``<run>/landmark_cnn.pth``, which
        ``train.py --landmark-cnn --landmark-weights`` loads for FaceGCD."""
        if self.front_end is not None:
            save_landmark_weights(self.front_end.cnn, Path(out_dir) / LANDMARK_EXPORT)

    def clip_parameters(self) -> list[nn.Parameter]:
        """What ``--clip-grad`` clips together: the trainable image path (backbone, and Part fViT's landmark CNN).

        The class centres are left out, as arcface_torch clips its backbone only. Each rank holds its own block of
        the centres, so a norm that included them would differ between ranks: each rank would scale the same
        all-reduced backbone gradient by its own factor and the data-parallel replicas would drift apart.

        Returns:
            The trainable parameters of the backbone and the landmark front end.
        """
        return [p for p in self._encoder[0].parameters() if p.requires_grad]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone."""
        self.backbone.set_grad_checkpointing(enable)

    def get_params_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on trainable >= 2-D weights (class centres included), none on 1-D ones and ViT tokens."""
        skip = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", set)()}
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights with the full (num_classes, D) centre matrix; a collective under several processes.

        The centres are gathered to rank 0 on the CPU in class blocks (``PartialFC.gather_classes``); the state of
        the other ranks lacks ``partial_fc.weight`` (only rank 0 saves).
        """
        state = self.state_dict()
        full = self.partial_fc.full_weight()
        if full is None:
            del state["partial_fc.weight"]
        else:
            state["partial_fc.weight"] = full
        return state

    def load_checkpoint_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load :meth:`checkpoint_state_dict` output; this rank keeps its block of the centres."""
        state = dict(state_dict)
        full = state.pop("partial_fc.weight", None)
        if full is None or tuple(full.shape) != (self.cfg.num_classes, self.cfg.embedding_size):
            got = None if full is None else tuple(full.shape)
            raise CheckpointError(
                f"checkpoint centres have shape {got}; the model needs ({self.cfg.num_classes}, "
                f"{self.cfg.embedding_size})"
            )
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k != "partial_fc.weight"]
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


class _Encoder(nn.Module):
    """The image path: (trainable landmark CNN -> mosaic ->) backbone; returns (embeddings, landmarks or None)."""

    def __init__(self, front_end: LandmarkFrontEnd | None, backbone: nn.Module) -> None:
        super().__init__()
        self.front_end = front_end
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.front_end is None:
            return self.backbone(images), None
        coords = self.front_end.landmarks(images)
        mosaic = landmark_mosaic(images, coords, self.front_end.patch, self.front_end.orientation)
        return self.backbone(mosaic), coords


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


def build_recognizer(
    cfg: RecognitionConfig,
    pretrained_weights: str | Path | None = None,
    checkpoint_key: str = "teacher",
    weights_only: bool = True,
) -> FaceRecognizer:
    """A recognition model, its backbone optionally initialised from ``pretrained_weights``.

    Args:
        cfg: the model configuration.
        pretrained_weights: DINO or timm weights for a ViT backbone; an arcface_torch ``backbone.pth`` (bare state
            dict, arcface_torch key names) for an IResNet, whose architecture, input size and embedding size must be
            ``cfg``'s.
        checkpoint_key: entry of a full DINO checkpoint holding the ViT weights (unused for IResNets).
        weights_only: safe loading; False only for trusted files holding other pickled objects.

    Returns:
        The model (class centres freshly initialised).
    """
    model = FaceRecognizer(cfg)
    if pretrained_weights:
        if isinstance(model.backbone, ViTEmbedder):
            load_pretrained_backbone(model.backbone.vit, pretrained_weights, checkpoint_key, weights_only=weights_only)
        else:
            load_arcface_torch_weights(model.backbone, pretrained_weights, weights_only=weights_only)
            logger.info("backbone %s from arcface_torch weights %s", cfg.arch, pretrained_weights)
    return model


def recognizer_from_checkpoint(ckpt: dict, source: str | Path) -> FaceRecognizer:
    """Rebuild a recognition model from its training checkpoint dict (its ``model_config``), on the CPU.

    Raises:
        CheckpointError: not a recognition checkpoint, or weights that do not fit its config (``source`` named).
    """
    stored = ckpt.get("model_config")
    if not isinstance(stored, dict) or stored.get("method") != METHOD:
        raise CheckpointError(f"{source} is not a recognition checkpoint (no model_config with method {METHOD})")
    model = FaceRecognizer(RecognitionConfig.from_dict(stored))
    try:
        model.load_checkpoint_state_dict(ckpt["state_dict"])
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err
    logger.info("loaded recognition model from %s (epoch %s)", source, ckpt.get("epoch", "not stored"))
    return model
