"""Frozen conditioning pass of FaceGCD (docs/method.md, section 5.3).

References:
    - FaceGCD: Generalized Face Discovery via Dynamic Prefix Generation (Oh & Choi, BMVC 2025), arXiv 2507.22353:
      the HyperNetwork is conditioned on every layer of the plain, pretrained ViT.
"""

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.vit import PrefixViT

logger = logging.getLogger(__name__)


class FrozenConditioner(nn.Module):
    """Prefix-free pass of the pretrained ViT, pooled per layer: (depth, B, D).

    For block l with output x_l and E_l = norm(x_l) (the backbone's final, frozen LayerNorm):
    layer-embed variant u_l = mean_t E_l[:, t]; plain variant s_l = mean_t z(E_l[:, t]) with z the parameter-free
    LayerNorm (eps 1e-5), so a HyperNet's LayerNorm affine gives mean_t LN_k(E_l) exactly.

    Every frozen weight is shared with the backbone, which is passed to `forward` (patch embedding, CLS, position
    embedding, frozen blocks, final norm), so nothing is stored twice. Blocks the backbone trains (index >=
    `first_trainable_block`) are kept here as frozen copies of their pretrained weights, `blocks.<i>.*`.
    """

    def __init__(self, backbone: PrefixViT, *, first_trainable_block: int, layer_embed: bool = False) -> None:
        """Copy the backbone's trainable blocks (call after loading the pretrained weights).

        Args:
            backbone: Backbone holding the pretrained weights.
            first_trainable_block: Index of the first block trained in the backbone (0: all blocks).
            layer_embed: Pool plain token means (layer-embed HyperNets) instead of z-normalised ones.
        """
        super().__init__()
        self.depth = len(backbone.blocks)
        self.layer_embed = layer_embed
        self.blocks = nn.ModuleDict(
            {str(i): copy.deepcopy(backbone.blocks[i]) for i in range(max(first_trainable_block, 0), self.depth)}
        )
        self.requires_grad_(False)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token mean of normalised tokens (B, T, D) -> (B, D), z-normalised first in the plain variant."""
        if not self.layer_embed:
            tokens = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-5)
        return tokens.mean(dim=1)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, backbone: PrefixViT) -> torch.Tensor:
        """Run the plain pretrained ViT on the shared token embedding and pool every layer.

        Args:
            tokens: Token embedding (B, T, D) from `backbone.embed_tokens`.
            backbone: The backbone whose frozen weights are shared.

        Returns:
            Pooled conditioning (depth, B, D), without gradient.
        """
        if len(backbone.blocks) != self.depth:
            raise ValueError(f"backbone has {len(backbone.blocks)} blocks, the conditioner {self.depth}")
        x = tokens
        pooled = []
        for i, shared_block in enumerate(backbone.blocks):
            block = self.blocks[str(i)] if str(i) in self.blocks else shared_block
            x = block(x)
            pooled.append(self.pool(backbone.norm(x)))
        return torch.stack(pooled)
