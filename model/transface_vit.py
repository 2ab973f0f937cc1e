"""TransFace's patch-9 ViTs (Dan et al., ICCV 2023): all tokens, a token gate and a two-layer neck (docs/transface.md).

A 112 px image is cut into 9 x 9 patches by a stride-9 convolution, 12 x 12 = 144 tokens in row-major order (token t
covers rows 9 (t // 12) ... + 8 and columns 9 (t % 12) ... + 8); pixel rows and columns 108-111 are never seen, as in
the release. There is no CLS token: a learned position embedding is added, pre-norm blocks (8 heads, qkv without bias,
ReLU6 MLP of ratio 4, attention softmax in float32) run, then a final LayerNorm. In training, a random fraction of the
tokens can be dropped before the blocks and replaced afterwards by one learned mask token (MAE-style keep and restore).
The token gate g = sigmoid(W2 relu(W1 flatten(X))) (W1: T D -> T, W2: T -> T, no biases) scales each token; the neck
flatten -> Linear(T D -> D) -> BN -> Linear(D -> E) -> BN gives the embedding. The gate and each gated token's standard
deviation over channels are what DPAP (ranking) and EHSM (sample weights) read, through :meth:`forward_with_tokens`.

Module and parameter names are the release's, so its ``model.pt`` state dict loads as it is
(:func:`load_transface_weights`).

Reference: DanJun6737/TransFace ``backbones/vit.py`` and ``backbones/__init__.py`` (sizes, drop path and masking).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import checkpoint

from utils.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

PATCH = 9  # the release's patch side
HEADS = 8
MLP_RATIO = 4
BN_EPS = 2e-5
RELEASE_MASK_RATIO = 0.1  # what the release masks whenever its mask ratio is > 0 (the ratio is never passed on)


@dataclass(frozen=True)
class TransFaceSize:
    """One released size: width D, depth, drop path rate and (nominal) masking ratio."""

    width: int
    depth: int
    drop_path: float
    mask_ratio: float


# The variants the release's configs and README use: vit_t_dp005_mask0, vit_s_dp005_mask_0, vit_b_dp005_mask_005,
# vit_l_dp005_mask_005.
TRANSFACE_SIZES = {
    "transface_vit_t": TransFaceSize(256, 12, 0.05, 0.0),
    "transface_vit_s": TransFaceSize(512, 12, 0.05, 0.0),
    "transface_vit_b": TransFaceSize(512, 24, 0.05, 0.05),
    "transface_vit_l": TransFaceSize(768, 24, 0.05, 0.05),
}
TRANSFACE_ARCHS = tuple(TRANSFACE_SIZES)


class TokenOutputs(NamedTuple):
    """What the method reads from a forward: the embedding, the gate (B, T) and the gated tokens' std (B, T)."""

    embedding: torch.Tensor
    gate: torch.Tensor
    token_std: torch.Tensor


def token_pixel_box(token: int, grid: int = 12) -> tuple[slice, slice]:
    """The (rows, cols) pixel slices token ``token`` covers in a ``grid`` x ``grid`` layout of 9 x 9 patches."""
    if not 0 <= token < grid * grid:
        raise ValueError(f"token {token} outside [0, {grid * grid})")
    row, col = divmod(token, grid)
    return slice(PATCH * row, PATCH * row + PATCH), slice(PATCH * col, PATCH * col + PATCH)


class PatchEmbed(nn.Module):
    """Stride-9 convolution: (B, 3, S, S) -> (B, (S // 9)^2, D); the last S mod 9 rows and columns are not read."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=PATCH, stride=PATCH)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias; q k^T, softmax and the product with v in float32."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, HEADS, width // HEADS).permute(2, 0, 3, 1, 4)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    """Linear(D, 4D) -> ReLU6 -> Linear(4D, D)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, width: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransFaceViT(nn.Module):
    """TransFace's ViT (see the module docstring).

    Args:
        width: token width D.
        depth: number of blocks.
        img_size: square input side S; the grid is S // 9 (12 at 112 px).
        embedding_size: E, the embedding dimension.
        drop_path: largest drop path rate (linearly spaced from 0 over the blocks).
        mask_ratio: fraction r of the tokens dropped in training; int(T (1 - r)) tokens are kept.
        release_masking: mask 10 % of the tokens whenever ``mask_ratio`` > 0, as the release does.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        *,
        img_size: int = 112,
        embedding_size: int = 512,
        drop_path: float = 0.0,
        mask_ratio: float = 0.0,
        release_masking: bool = False,
    ) -> None:
        super().__init__()
        if img_size < PATCH or width % HEADS:
            raise ValueError(f"TransFace ViT needs an input of at least {PATCH} px and a width divisible by {HEADS}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"--transface-mask-ratio must be in [0, 1), got {mask_ratio}")
        self.grid = img_size // PATCH
        self.num_patches = self.grid * self.grid
        self.embed_dim, self.num_features = width, embedding_size
        self.mask_ratio = RELEASE_MASK_RATIO if release_masking and mask_ratio > 0 else float(mask_ratio)
        self.grad_checkpointing = False
        tokens_dim = self.num_patches * width
        self.patch_embed = PatchEmbed(width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, width))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(width, rate) for rate in rates)
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(tokens_dim, width, bias=False),
            nn.BatchNorm1d(width, eps=BN_EPS),
            nn.Linear(width, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )
        # kept (and loaded) without masking too, as in the release, but then frozen: an unused trainable parameter
        # would stall DDP's gradient reduction
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width), requires_grad=self.mask_ratio > 0)
        nn.init.normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)
        # created after the init pass, so the gate keeps PyTorch's default Linear initialisation (as released)
        self.senet = nn.Sequential(
            nn.Linear(tokens_dim, self.num_patches, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(self.num_patches, self.num_patches, bias=False),
            nn.Sigmoid(),
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Per-block activation checkpointing in training."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Tokens that the field's habit leaves out of weight decay (the release decays everything)."""
        return {"pos_embed", "mask_token"}

    def kept_tokens(self) -> int:
        """Tokens that reach the blocks in training: int(T (1 - r))."""
        return int(self.num_patches * (1 - self.mask_ratio))

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``kept_tokens()`` of each sample's tokens; returns them and the restoring permutation."""
        order = torch.argsort(torch.rand(x.shape[0], x.shape[1], device=x.device), dim=1)
        keep = order[:, : self.kept_tokens()]
        return torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[2])), torch.argsort(order, dim=1)

    def forward_with_tokens(self, images: torch.Tensor) -> TokenOutputs:
        """(B, 3, S, S) normalised images -> embedding (B, E), gate (B, T), gated tokens' std over channels (B, T).

        The final norm, mask restore, gate, token std and neck run in float32 (autocast off), as in the release.
        """
        x = self.patch_embed(images) + self.pos_embed
        masked = self.training and self.mask_ratio > 0
        if masked:
            x, restore = self._mask(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = self.norm(x.float())
            if masked:
                fill = self.mask_token.float().expand(x.shape[0], self.num_patches - x.shape[1], -1)
                x = torch.gather(torch.cat([x, fill], dim=1), 1, restore[..., None].expand(-1, -1, x.shape[2]))
            gate = self.senet(x.flatten(1))
            gated = x * gate[..., None]
            embedding = self.feature(gated.flatten(1))
        return TokenOutputs(embedding, gate, gated.std(dim=2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, E) embeddings (not normalised)."""
        return self.forward_with_tokens(images).embedding


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (0.02) Linear weights with zero biases, LayerNorms (1, 0)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_transface_vit(
    arch: str,
    *,
    img_size: int = 112,
    embedding_size: int = 512,
    drop_path: float | None = None,
    mask_ratio: float | None = None,
    release_masking: bool = False,
) -> TransFaceViT:
    """A randomly initialised ``transface_vit_{t,s,b,l}``.

    Args:
        arch: one of ``TRANSFACE_ARCHS``.
        img_size: square input side (112 for the release's weights).
        embedding_size: embedding dimension (512 as released).
        drop_path: drop path rate; None for the variant's released rate.
        mask_ratio: training masking ratio; None for the variant's released (nominal) ratio.
        release_masking: mask 10 % whenever the ratio is > 0 (the release's behaviour).

    Returns:
        The backbone.
    """
    if arch not in TRANSFACE_SIZES:
        raise ValueError(f"unknown TransFace --arch {arch!r}; expected one of {', '.join(TRANSFACE_ARCHS)}")
    size = TRANSFACE_SIZES[arch]
    return TransFaceViT(
        size.width,
        size.depth,
        img_size=img_size,
        embedding_size=embedding_size,
        drop_path=size.drop_path if drop_path is None else drop_path,
        mask_ratio=size.mask_ratio if mask_ratio is None else mask_ratio,
        release_masking=release_masking,
    )


def load_transface_weights(model: TransFaceViT, path: str | Path, *, weights_only: bool = True) -> None:
    """Load a TransFace release ``model.pt`` (a bare state dict with the release's key names) into ``model``.

    Raises:
        CheckpointError: the file is not a state dict of this size (missing, unexpected or misshapen keys named).
    """
    state = torch.load(path, map_location="cpu", weights_only=weights_only)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected a TransFace model.pt state dict (key name -> tensor)")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or misshapen:
        raise CheckpointError(
            f"{path} does not fit this TransFace ViT (width {model.embed_dim}, {len(model.blocks)} blocks, "
            f"{model.num_patches} tokens): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"misshapen {misshapen[:5]}"
        )
    model.load_state_dict(state)
    logger.info("TransFace weights from %s", path)
