"""TransFace's EHSM weights, entropy-guided hard sample mining: w = 1 + exp(-gamma * mean of the top-K token stds).

The release's per-token "entropy" is the standard deviation of a gated token's features over its channels (its
Gaussian-entropy formula is left commented out); a sample whose tokens carry little spread counts as hard and weighs up
to 2 in the cross-entropy. The weights are constants of the loss (no gradient flows through them).

Reference: DanJun6737/TransFace ``backbones/vit.py`` (the token std) and ``partial_fc_exp.py`` (the weights, K = 144 and
gamma = 1 hard-coded there).
"""

from __future__ import annotations

import torch


def ehsm_weights(token_std: torch.Tensor, gamma: float = 1.0, topk: int = 0) -> torch.Tensor:
    """Per-sample EHSM weights.

    Args:
        token_std: (B, T) standard deviation of each gated token over its channels.
        gamma: scale of the mean before the exponential.
        topk: K, the largest stds averaged per sample; 0 for all T tokens (the release's K = 144 at 112 px).

    Returns:
        (B,) float32 weights in (1, 2], detached.
    """
    tokens = token_std.shape[1]
    if not 0 <= topk <= tokens:
        raise ValueError(f"--ehsm-topk {topk} must be in [0, {tokens}] (0 for all tokens)")
    with torch.no_grad():
        std = token_std.float()
        top = std if topk in (0, tokens) else std.topk(topk, dim=1).values
        return 1 + torch.exp(-gamma * top.mean(dim=1))
