"""FaceCoresetNet's template aggregator (Shapira Weber et al., AAAI 2024): a core set chosen by quality-aware
farthest-point sampling, then attention from the core to the whole template.

A template holds N images of one person; its input is their unit embeddings u_j (N, D) and embedding norms n_j (the
quality proxy of an AdaFace-trained recognizer). With K' = min(K, N):

    x_j = n_j u_j                                                       (norm as quality)
    pick 1:     y_1 = onehot(argmax_j n_j)
    pick k > 1: d_j = min over the core items c of  n_j^gamma (1 - cos(x_j, c)) / 2;   y_k = onehot(argmax_j d_j)
    core        c_k = sum_j y_kj x_j                                    (C: K' x D)

The argmax is exact at inference (items already in the core are skipped, so ties between duplicates cannot re-pick
one). In training each argmax is a hard, straight-through Gumbel-softmax over the N items at temperature tau = 1:
y = onehot(argmax(l + g)) - sg(s) + s with s = softmax((l + g) / tau) and g Gumbel noise, so the forward uses the
hard pick and the backward the soft one; gamma (learnable, initialised at 0.01) thus gets a gradient through the
distances that rank the candidates. Items picked before are not excluded in training (as released).

Then, with E(v) the sinusoidal encoding of a norm, E(v)_{2i} = sin(2 pi v / 10000^{2i/D}), E(v)_{2i+1} = cos(same),
followed by a learnable LayerNorm (shared by core and template):

    q = C + E(norms of C)
    q = LN_1(q + Drop(SelfAttn(q, q, q)))                               (among the core items)
    o = LN_2(C + Drop(CrossAttn(q, X + E(n), X)))                       (core -> whole template)
    a = mean_k (C + o)_k;   output a / |a| and |a|

with 8-head attention (dropout 0.1 on the attention weights too) and no feed-forward layer, as released. The cost is
linear in N: the distances are (N,) per pick and the cross-attention scores (heads, K', N); no N x N tensor exists.

Templates of different sizes batch with a mask (True = a real item): padded items are never picked and never
attended, and each template's core has min(K, N_b) items. Note that the output is not invariant to repeating an
item: the cross-attention keys count duplicates (the core alone is).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The released default core size is 5 (config.py); the paper's best and its training script's is 3: ours is 3.
DEFAULT_CORE_SIZE = 3
GAMMA_INIT = 0.01
_NORM_FLOOR = 1e-6


def norm_encoding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of scalar norms: E(v)_{2i} = sin(2 pi v / 10000^(2i/dim)), E(v)_{2i+1} = cos(same).

    Args:
        values: (...) norms.
        dim: encoding size (even).

    Returns:
        (..., dim) encodings in the dtype of ``values`` (float32 for integer input).
    """
    if dim % 2:
        raise ValueError(f"the norm encoding needs an even size, got {dim}")
    values = values if values.is_floating_point() else values.float()
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=values.device) / dim
    inverse = (10000.0**-exponent).to(values.dtype)
    angle = 2.0 * math.pi * values[..., None] * inverse
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)


def _pick(
    logits: torch.Tensor, allowed: torch.Tensor, hard_argmax: bool, tau: float, gumbel: torch.Tensor | None
) -> torch.Tensor:
    """One pick over the last axis: an exact one-hot argmax, or a straight-through hard Gumbel-softmax."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    if hard_argmax:
        return F.one_hot(masked.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if gumbel is None:
        gumbel = -torch.empty_like(logits).exponential_().log()
    soft = torch.softmax((masked + gumbel) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def select_core(
    units: torch.Tensor,
    norms: torch.Tensor,
    gamma: torch.Tensor | float,
    core_size: int,
    mask: torch.Tensor | None = None,
    *,
    hard_argmax: bool = True,
    tau: float = 1.0,
    gumbel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quality-aware farthest-point sampling (module docstring): the selection matrix of the core items.

    Args:
        units: (B, N, D) unit embeddings (normalised here again).
        norms: (B, N) embedding norms (> 0).
        gamma: the distance exponent (a tensor for gradients).
        core_size: K; each template gets min(K, N_b) core items.
        mask: (B, N) bool, True for real items (default: all real).
        hard_argmax: exact argmax picks (inference); False: straight-through Gumbel-softmax (training).
        tau: Gumbel-softmax temperature.
        gumbel: (B, K', N) Gumbel noise for the training picks (default: drawn from torch's generator).

    Returns:
        ((B, K', N) one-hot rows, straight-through in training; (B, K') bool, True for the real core items), with
        K' = min(K, max N_b).
    """
    if core_size < 1:
        raise ValueError(f"the core size must be >= 1, got {core_size}")
    batch, items = norms.shape
    mask = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask
    if units.shape[:2] != (batch, items) or mask.shape != (batch, items):
        raise ValueError(
            f"expected (B, N, D) units and (B, N) norms and mask, got {tuple(units.shape)}, "
            f"{tuple(norms.shape)} and {tuple(mask.shape)}"
        )
    sizes = mask.sum(-1)
    if bool((sizes == 0).any()):
        raise ValueError("an empty template (no real item) has no core")
    picks = min(core_size, items)
    units = F.normalize(units, dim=-1)
    weight = norms.clamp_min(_NORM_FLOOR) ** gamma
    chosen = torch.zeros_like(mask)
    rows = []
    logits = norms
    distance = None
    for k in range(picks):
        allowed = mask & ~chosen if hard_argmax else mask
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, mask)  # slots past a template's size
        noise = None if gumbel is None else gumbel[:, k]
        row = _pick(logits, allowed, hard_argmax, tau, noise)
        rows.append(row)
        chosen = chosen | row.detach().bool()
        centre = F.normalize(torch.einsum("bn,bnd->bd", row, units), dim=-1)
        new = weight * (1.0 - torch.einsum("bnd,bd->bn", units, centre)) / 2.0
        distance = new if distance is None else torch.minimum(distance, new)
        logits = distance
    valid = torch.arange(picks, device=norms.device)[None, :] < sizes[:, None]
    return torch.stack(rows, 1), valid


class CoresetAggregator(nn.Module):
    """FaceCoresetNet's aggregator (module docstring): (unit embeddings, norms) of templates -> (unit, norm).

    Args:
        dim: embedding size D (the attention's d_model; divisible by ``heads``).
        core_size: K.
        heads: attention heads.
        dropout: dropout of the attention weights and of the two attention outputs.
        gamma_init: initial gamma.
        tau: Gumbel-softmax temperature in training.
    """

    def __init__(
        self,
        dim: int = 512,
        core_size: int = DEFAULT_CORE_SIZE,
        heads: int = 8,
        dropout: float = 0.1,
        gamma_init: float = GAMMA_INIT,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if core_size < 1 or dim % heads or dim % 2:
            raise ValueError(f"need core_size >= 1 and an even dim divisible by heads; got {core_size}, {dim}, {heads}")
        self.dim, self.core_size, self.tau = dim, core_size, tau
        self.gamma = nn.Parameter(torch.tensor(float(gamma_init)))
        self.encoding_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, core_size={self.core_size}, tau={self.tau}"

    def encode(self, norms: torch.Tensor) -> torch.Tensor:
        """LayerNorm(E(norms)): (...) -> (..., D)."""
        return self.encoding_norm(norm_encoding(norms, self.dim))

    def forward(
        self,
        units: torch.Tensor,
        norms: torch.Tensor,
        mask: torch.Tensor | None = None,
        gumbel: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate a batch of (padded) templates.

        Args:
            units: (B, N, D) unit embeddings.
            norms: (B, N) embedding norms.
            mask: (B, N) bool, True for real items (default: all real).
            gumbel: (B, K', N) Gumbel noise of the training picks (default: drawn from torch's generator).

        Returns:
            ((B, D) unit template embeddings, (B, 1) their norms |a|).
        """
        mask = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask
        norms = norms.masked_fill(~mask, 0.0)
        units = F.normalize(units, dim=-1).masked_fill(~mask[..., None], 0.0)
        x = norms[..., None] * units
        rows, valid = select_core(
            units, norms, self.gamma, self.core_size, mask, hard_argmax=not self.training, tau=self.tau, gumbel=gumbel
        )
        core = rows @ x
        core_norms = (rows * norms[:, None, :]).sum(-1)
        query = core + self.encode(core_norms)
        attended = self.self_attn(query, query, query, key_padding_mask=~valid, need_weights=False)[0]
        query = self.norm1(query + self.dropout1(attended))
        keys = x + self.encode(norms)
        attended = self.cross_attn(query, keys, x, key_padding_mask=~mask, need_weights=False)[0]
        out = core + self.norm2(core + self.dropout2(attended))
        weights = valid.to(out.dtype)[..., None]
        pooled = (out * weights).sum(1) / weights.sum(1)
        norm = pooled.norm(dim=-1, keepdim=True)
        return pooled / norm.clamp_min(_NORM_FLOOR), norm
