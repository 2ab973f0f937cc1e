"""Prefix-aware attention and transformer block for timm's VisionTransformer.

References:
    - FaceGCD: Generalized Face Discovery via Dynamic Prefix Generation (Oh & Choi, BMVC 2025), arXiv 2507.22353.
    - Prefix-Tuning (Li & Liang, ACL 2021): per-layer key/value prefixes, queries unchanged.
    - timm `Attention` / `Block` (huggingface/pytorch-image-models, timm/layers/attention.py,
      timm/models/vision_transformer.py), which these classes extend without copying.
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

logger = logging.getLogger(__name__)


class PrefixAttention(Attention):
    """timm multi-head self-attention whose keys and values can be extended by per-image prefixes.

    Parameters (`qkv`, `proj`) are timm's and therefore DINO's. Without a prefix the parent forward runs unchanged
    (except in low-precision CPU training, see `cpu_training_kernel`), so a prefix-free model is timm's ViT. With a
    prefix (2, B, H, P, e) the keys and values become concat(P_K, k) and concat(P_V, v) along the token axis,
    (B, H, P + T, e); the queries stay (B, H, T, e), so T tokens come out. Prefixes are cast to the dtype of the
    queries (the autocast dtype under autocast).
    """

    # Kernel for CPU training: "auto" (explicit product-softmax-product under a low-precision autocast, the fused
    # `scaled_dot_product_attention` otherwise), "explicit" or "fused". PyTorch's fused CPU kernel is slow to
    # back-propagate through in bfloat16: explicit/fused forward+backward time 0.38-0.63 at 17-197 tokens (ViT-T and
    # ViT-S widths, 2 threads), but 0.92-1.23 in float32, where "auto" keeps the fused kernel. On CUDA and without
    # autograd the fused kernel always runs. Measured by `python -m benchmarks.cpu_attention`.
    cpu_training_kernel: str = "auto"

    def uses_explicit_kernel(self, x: torch.Tensor) -> bool:
        """Whether attention over `x` runs the explicit kernel (CPU training only, see `cpu_training_kernel`)."""
        if self.cpu_training_kernel not in ("auto", "explicit", "fused"):
            raise ValueError(f"cpu_training_kernel must be auto, explicit or fused, got {self.cpu_training_kernel!r}")
        if x.device.type != "cpu" or not torch.is_grad_enabled() or self.cpu_training_kernel == "fused":
            return False
        if self.cpu_training_kernel == "explicit":
            return True
        autocast_low = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32
        return autocast_low or x.dtype in (torch.bfloat16, torch.float16)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        prefix: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend over the tokens of `x`, optionally with prefixed keys and values.

        Args:
            x: Tokens (B, T, D).
            attn_mask: Optional attention mask; with a prefix it must cover the P + T keys.
            is_causal: Causal masking (only without a prefix).
            prefix: Optional (2, B, H, P, e) key and value prefixes for this layer (B may be 1 to broadcast).

        Returns:
            Tokens (B, T, D).
        """
        explicit = self.uses_explicit_kernel(x)
        if prefix is None and (is_causal or not explicit):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if is_causal:
            raise ValueError("PrefixAttention: is_causal is not supported together with a prefix")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, e) each
        q, k = self.q_norm(q), self.k_norm(k)
        if prefix is not None:
            prefix_k, prefix_v = prefix.to(q.dtype).unbind(0)  # (B, H, P, e) each
            k = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
        if explicit:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            elif attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        x = x.transpose(1, 2).reshape(B, N, -1)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


class PrefixBlock(Block):
    """timm pre-norm transformer block that hands per-layer prefixes to its attention.

    Construction is timm's `Block` (pass `attn_layer=PrefixAttention`); only `forward` gains a `prefix` argument.
    """

    def forward(
        self,
        x: torch.Tensor,
        prefix: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Run the block.

        Args:
            x: Tokens (B, T, D).
            prefix: Optional (2, B, H, P, e) key/value prefixes for this block.
            attn_mask: Optional attention mask.
            is_causal: Causal masking (only without a prefix).

        Returns:
            Tokens (B, T, D).
        """
        attn_kwargs = {"attn_mask": attn_mask, "is_causal": is_causal}
        if prefix is not None:
            attn_kwargs["prefix"] = prefix
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
