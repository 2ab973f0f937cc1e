"""Margin-softmax face recognition as a training method: embedding backbone + Partial FC with a margin head.

The backbone (a registered ViT with an embedding neck, or an IResNet) is data parallel: under several processes only
it is wrapped in DDP. The class centres are model parallel (``PartialFC``: each rank holds a contiguous block of the
classes, embeddings and labels are all-gathered), so they are never wrapped. Checkpoints hold the full centre matrix
and the full optimiser state of it (gathered from all ranks), so a run resumes exactly and loads on any world size.
Evaluation features are the L2-normalised embeddings.

TransFace (``transface_vit_*`` backbones, docs/transface.md) adds two switches: DPAP perturbs the amplitude spectrum of
each selected image's highest-gated patches before the training forward, ranked by a no-grad pass of the backbone that
never calls Partial FC; EHSM weights each sample's cross-entropy inside Partial FC by 1 + exp(-gamma * mean token std).
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
from model.centre_state import ShardedCentresState
from model.dpap import DPAP
from model.ehsm import ehsm_weights
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
from model.partial_fc import WEIGHT_NORMALISATIONS, PartialFC
from model.transface_vit import TransFaceViT, load_transface_weights
from model.vit import load_pretrained_backbone
from utils.checkpoint import CheckpointError
from utils.distributed import get_world_size
from utils.presets import FACE_PRESET, preset_normalisation

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
        input_preset: the input preset the images are normalised with (DPAP undoes and redoes its normalisation).
        weight_decay_on: "matrices" (>= 2-D weights except position embeddings and tokens) or "all" parameters
            (TransFace's release).
        drop_path: TransFace ViTs: drop path rate (None: the variant's released rate).
        mask_ratio: TransFace ViTs: training token masking ratio (None: the variant's released ratio).
        release_masking: TransFace ViTs: mask 10 % of the tokens whenever the ratio is > 0, as the release does.
        dpap: TransFace's dominant patch amplitude perturbation of the training images.
        dpap_prob: probability that a sample is perturbed.
        dpap_patches: dominant patches perturbed per selected sample.
        dpap_train_mode_ranking: rank the patches with the backbone in training mode (masking, drop path, neck
            BatchNorm statistics updated), as the release does, instead of evaluation mode.
        ehsm: TransFace's entropy-guided hard sample mining: per-sample weights of the cross-entropy.
        ehsm_gamma: gamma of the weights 1 + exp(-gamma * mean of the top-K token stds).
        ehsm_topk: K (0: all tokens, as released).
        ehsm_normalise: "batch" (divide the weighted loss by N, as released) or "weights" (by the sum of weights).
        grad_from_block: registered ViTs: first trained block; the patch embedding, tokens, earlier blocks and the final
            norm stay frozen (FaceGCD's ``--grad-from-block``); 0 trains the whole backbone (arcface_torch).
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
    input_preset: str = FACE_PRESET
    weight_decay_on: str = "matrices"
    drop_path: float | None = None
    mask_ratio: float | None = None
    release_masking: bool = False
    dpap: bool = False
    dpap_prob: float = 0.2
    dpap_patches: int = 7
    dpap_train_mode_ranking: bool = False
    ehsm: bool = False
    ehsm_gamma: float = 1.0
    ehsm_topk: int = 0
    ehsm_normalise: str = "batch"
    grad_from_block: int = 0


WEIGHT_DECAY_SCOPES = ("matrices", "all")


class FaceRecognizer(ShardedCentresState, MetaArch):
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
            drop_path=cfg.drop_path,
            mask_ratio=cfg.mask_ratio,
            release_masking=cfg.release_masking,
        )
        _check_transface_options(cfg, self.backbone)
        if cfg.grad_from_block:
            _freeze_vit_below(self.backbone, cfg.grad_from_block, cfg.arch)
        self.front_end: LandmarkFrontEnd | None = None
        if cfg.landmark_cnn:
            if not isinstance(self.backbone, ViTEmbedder):
                raise ValueError(f"--landmark-cnn (Part fViT) needs a ViT backbone; --arch {cfg.arch} is not one")
            if cfg.landmark_regularisation and cfg.grad_from_block:
                raise ValueError(
                    f"--landmark-regularisation regularises the learned landmarks; with --grad-from-block "
                    f"{cfg.grad_from_block} the landmark CNN is frozen (it trains with --grad-from-block 0 only)"
                )
            # below the first trained block, as the patch embedding: frozen when the lower blocks are
            self.front_end = LandmarkFrontEnd(
                cfg.img_size, cfg.patch_size, orientation=cfg.landmark_tiles, frozen=bool(cfg.grad_from_block)
            )
        elif cfg.landmark_regularisation:
            raise ValueError("--landmark-regularisation needs --landmark-cnn (it regularises the learned landmarks)")
        self.partial_fc = PartialFC(
            cfg.embedding_size, cfg.num_classes, build_margin_head(cfg.head, **cfg.head_args), cfg.sample_rate
        )
        if cfg.ehsm and self.partial_fc.head.kind != "softmax":
            raise ValueError(f"--ehsm weights a softmax cross-entropy; --head {cfg.head} is not a softmax head")
        self.dpap: DPAP | None = None
        if cfg.dpap:
            self.dpap = DPAP(cfg.dpap_prob, cfg.dpap_patches, *preset_normalisation(cfg.input_preset))
        self.epoch = 0
        if cfg.landmark_regularisation:
            self.reference_front_end = LandmarkFrontEnd(
                cfg.img_size, cfg.patch_size, orientation=cfg.landmark_tiles, frozen=True
            )
        # DDP wraps the trainable image path (front end + backbone); kept in a list so it is not a submodule
        self._encoder = [_Encoder(self.front_end, self.backbone, with_tokens=cfg.ehsm)]
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
        """(B, 3, S, S) -> ((B, embedding_size) embeddings, landmarks or None), through DDP when distributed
        (:meth:`embed_with_tokens` without the token stds)."""
        return self.embed_with_tokens(images)[:2]

    def embed_with_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(B, 3, S, S) -> ((B, embedding_size) embeddings, landmarks or None, token stds under EHSM or None), through
        DDP when distributed.

        Partial FC gives each rank's embeddings the gradient of the loss averaged over the global batch, and DDP
        averages the backbone gradients over the W ranks once more; the embedding gradient is scaled by W so the
        backbone gets the gradient of the global mean loss, as with one process (arcface_torch does the same).
        """
        if not self._ddp_encoder:
            return self._encoder[0](images)
        embeddings, coords, token_std = self._ddp_encoder[0](images)
        if embeddings.requires_grad:
            world = get_world_size()
            embeddings.register_hook(lambda grad: grad * world)
        return embeddings, coords, token_std

    def freeze_reference_landmarks(self) -> None:
        """LAFS: the frozen copy takes the landmark CNN's current weights (call once they are loaded)."""
        if self.cfg.landmark_regularisation:
            self.reference_front_end.cnn.load_state_dict(self.front_end.cnn.state_dict())

    def begin_epoch(self, epoch: int) -> None:
        """The epoch selects the landmark regularisation weight."""
        self.epoch = int(epoch)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step forward: (mosaic,) embeddings, margin logits over the (sampled) centres, the loss.

        With DPAP the images are first perturbed, in place (:meth:`dominant_patch_gate` ranks their patches; the
        loop does not reuse the batch); with EHSM each sample's cross-entropy is weighted by its EHSM weight
        (``model.ehsm``).

        Returns:
            The Partial FC outputs, with ``loss`` (plus ``landmark_reg`` under LAFS fine-tuning, ``ehsm_weight``, the
            batch's mean EHSM weight, under EHSM).
        """
        if self.dpap is not None:
            images = self.dpap(images, self.dominant_patch_gate(images), inplace=True)
        embeddings, coords, token_std = self.embed_with_tokens(images)
        if token_std is None:
            out = self.partial_fc(embeddings, labels)
        else:
            weights = ehsm_weights(token_std, self.cfg.ehsm_gamma, self.cfg.ehsm_topk)
            out = self.partial_fc(embeddings, labels, weights, weight_normalise=self.cfg.ehsm_normalise)
            out["ehsm_weight"] = weights.mean()
        if self.cfg.landmark_regularisation:
            reference = self.reference_front_end.landmarks(images)
            regulariser = landmark_regularisation(coords, reference, self.cfg.img_size)
            out["landmark_reg"] = regulariser.detach()
            out["loss"] = out["loss"] + landmark_regularisation_weight(self.epoch) * regulariser
        return out

    @torch.no_grad()
    def dominant_patch_gate(self, images: torch.Tensor) -> torch.Tensor:
        """DPAP's ranking pass: the (B, T) token gate of the backbone without gradients, in evaluation mode (no
        masking, no drop path, BatchNorm statistics untouched) unless ``dpap_train_mode_ranking``; Partial FC is not
        called, so its sampling step and any head buffers advance once per training step."""
        was_training = self.backbone.training
        self.backbone.train(was_training and self.cfg.dpap_train_mode_ranking)
        try:
            return self.backbone.forward_with_tokens(images).gate
        finally:
            self.backbone.train(was_training)

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
        """Decay on trainable >= 2-D weights (class centres included), none on 1-D ones and ViT tokens; on every
        trainable parameter with ``weight_decay_on`` "all" (TransFace's release)."""
        skip = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", set)()}
        decay_all = self.cfg.weight_decay_on == "all"
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if not decay_all and (param.ndim <= 1 or name in skip) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]


class _Encoder(nn.Module):
    """The image path: (trainable landmark CNN -> mosaic ->) backbone; returns (embeddings, landmarks or None, token
    stds or None). ``with_tokens``: a TransFace backbone also returns its gated tokens' stds (EHSM)."""

    def __init__(self, front_end: LandmarkFrontEnd | None, backbone: nn.Module, *, with_tokens: bool = False) -> None:
        super().__init__()
        self.front_end = front_end
        self.backbone = backbone
        self.with_tokens = with_tokens

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.with_tokens:
            outputs = self.backbone.forward_with_tokens(images)
            return outputs.embedding, None, outputs.token_std
        if self.front_end is None:
            return self.backbone(images), None, None
        coords = self.front_end.landmarks(images)
        mosaic = landmark_mosaic(images, coords, self.front_end.patch, self.front_end.orientation)
        return self.backbone(mosaic), coords, None


def _freeze_vit_below(backbone: nn.Module, first: int, arch: str) -> None:
    """Freeze a registered ViT's patch embedding, tokens, blocks before ``first`` and final norm; the later blocks and
    the embedding neck stay trainable."""
    if not isinstance(backbone, ViTEmbedder):
        raise ValueError(f"--grad-from-block {first}: registered ViTs only; --arch {arch} is not one")
    depth = len(backbone.vit.blocks)
    if not 0 < first < depth:
        raise ValueError(f"--grad-from-block {first}: expected 0 (all blocks) to {depth - 1} for --arch {arch}")
    backbone.vit.requires_grad_(False)
    for block in backbone.vit.blocks[first:]:
        block.requires_grad_(True)


def _check_transface_options(cfg: RecognitionConfig, backbone: nn.Module) -> None:
    """One clear error for TransFace options that do not fit the configuration."""
    if cfg.weight_decay_on not in WEIGHT_DECAY_SCOPES:
        raise ValueError(f"--weight-decay-on {cfg.weight_decay_on!r}: expected one of {', '.join(WEIGHT_DECAY_SCOPES)}")
    if not isinstance(backbone, TransFaceViT):
        used = [flag for flag, on in (("--dpap", cfg.dpap), ("--ehsm", cfg.ehsm)) if on]
        if used or cfg.release_masking or cfg.mask_ratio is not None or cfg.drop_path is not None:
            flags = ", ".join(used) or "--transface-mask-ratio/-drop-path/-release-masking"
            raise ValueError(f"{flags}: TransFace backbones only (transface_vit_t/s/b/l); --arch {cfg.arch} is not one")
    if cfg.ehsm_normalise not in WEIGHT_NORMALISATIONS:
        raise ValueError(f"--ehsm-normalise {cfg.ehsm_normalise!r}: expected one of {', '.join(WEIGHT_NORMALISATIONS)}")


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
            ``cfg``'s; a TransFace release ``model.pt`` (bare state dict, the release's key names) for a TransFace ViT.
        checkpoint_key: entry of a full DINO checkpoint holding the ViT weights (unused for IResNets).
        weights_only: safe loading; False only for trusted files holding other pickled objects.

    Returns:
        The model (class centres freshly initialised).
    """
    model = FaceRecognizer(cfg)
    if pretrained_weights:
        if isinstance(model.backbone, TransFaceViT):
            load_transface_weights(model.backbone, pretrained_weights, weights_only=weights_only)
        elif isinstance(model.backbone, ViTEmbedder):
            load_pretrained_backbone(
                model.backbone.vit,
                pretrained_weights,
                checkpoint_key,
                weights_only=weights_only,
                reads_mosaics=cfg.landmark_cnn,
            )
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
