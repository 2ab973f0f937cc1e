"""Embedding backbones for recognition training: every registered architecture maps an image to one vector.

The registered ViTs (``vit_tiny``, ``vit_small``, ``vit_base``; any patch size dividing the image size) get an
embedding neck, Linear(width -> embedding size, no bias) then BatchNorm1d, on their final-norm CLS token, as
arcface_torch's ViTs end in a linear feature layer with batch norm. The IResNets (``iresnet18/34/50/100``) already end
in a 512-d (``embedding_size``) BatchNorm1d feature layer. TransFace's patch-9 ViTs (``transface_vit_t/s/b/l``,
``model.transface_vit``) bring their own token gate and neck.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import model_entrypoint

from model.iresnet import IRESNET_ARCHS  # importing model.iresnet registers its entrypoints with timm
from model.transface_vit import TRANSFACE_ARCHS, create_transface_vit
from model.vit import PrefixViT, create_backbone, list_backbones


def list_embedding_backbones() -> list[str]:
    """Architecture names accepted by :func:`create_embedding_backbone`."""
    return list_backbones() + list(IRESNET_ARCHS) + list(TRANSFACE_ARCHS)


class ViTEmbedder(nn.Module):
    """A registered ViT whose CLS token passes Linear(no bias) -> BatchNorm1d to give the embedding.

    Args:
        vit: the backbone (no prefix generator).
        embedding_size: output dimension.
    """

    def __init__(self, vit: PrefixViT, embedding_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.neck = nn.Sequential(nn.Linear(vit.embed_dim, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))
        self.num_features = embedding_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Per-block activation checkpointing of the ViT."""
        self.vit.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """ViT parameters without weight decay (pos_embed, cls_token), with this module's prefix."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, embedding_size) embeddings (not normalised)."""
        return self.neck(self.vit(images))


def create_embedding_backbone(
    arch: str,
    *,
    img_size: int = 112,
    patch_size: int = 8,
    embedding_size: int = 512,
    dropout: float = 0.0,
    drop_path: float | None = None,
    mask_ratio: float | None = None,
    release_masking: bool = False,
) -> nn.Module:
    """Build a randomly initialised embedding backbone by registered name.

    Args:
        arch: one of :func:`list_embedding_backbones`.
        img_size: square input size in pixels.
        patch_size: ViT patch size (ignored by IResNets; TransFace's is 9).
        embedding_size: embedding dimension.
        dropout: dropout before the IResNet feature layer (ignored by ViTs).
        drop_path: TransFace ViTs: drop path rate, None for the variant's released one.
        mask_ratio: TransFace ViTs: training token masking ratio, None for the variant's released one.
        release_masking: TransFace ViTs: mask 10 % of the tokens whenever the ratio is > 0, as the release does.

    Returns:
        A module mapping (B, 3, S, S) to (B, embedding_size), with ``num_features`` = embedding_size.
    """
    if arch in TRANSFACE_ARCHS:
        return create_transface_vit(
            arch,
            img_size=img_size,
            embedding_size=embedding_size,
            drop_path=drop_path,
            mask_ratio=mask_ratio,
            release_masking=release_masking,
        )
    if arch in IRESNET_ARCHS:
        return model_entrypoint(arch)(img_size=img_size, dropout=dropout, embedding_size=embedding_size)
    if arch not in list_backbones():
        raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(list_embedding_backbones())}")
    return ViTEmbedder(create_backbone(arch, patch_size=patch_size, img_size=img_size), embedding_size)
