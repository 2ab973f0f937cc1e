"""DINO projection head (docs/method.md, section 5.6).

References:
    - DINO (Caron et al., ICCV 2021), facebookresearch/dino `DINOHead`; GCD (Vaze et al., CVPR 2022) uses it as the
      contrastive projection head. The weight-normalised last layer is written here because
      `nn.utils.weight_norm` is deprecated; parameter names (`weight_g`, `weight_v`) stay DINO's.
"""

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

logger = logging.getLogger(__name__)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with W = g * V / ||V||_row (`weight_g` (out, 1), `weight_v` (out, in))."""

    def __init__(self, in_features: int, out_features: int, *, train_g: bool = False) -> None:
        """Create the layer: `weight_v` with nn.Linear's default init, `weight_g` filled with 1.

        Args:
            in_features: Input width.
            out_features: Output width.
            train_g: Whether `weight_g` is trainable (DINO's `norm_last_layer=True` freezes it).
        """
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=train_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: (N, in).

        Returns:
            (N, out).
        """
        weight = self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """Linear(D, 2048)-GELU-Linear(2048, 2048)-GELU-Linear(2048, 256) -> L2 norm -> weight-normalised
    Linear(256, out_dim) [-> L2 norm].

    FaceGCD (as GCD) L2-normalises the output again, for its contrastive losses. DINO does not: its outputs are the
    cosines between the bottleneck and the K prototypes, in [-1, 1], which the DINO loss divides by its temperatures.
    Normalising them again would shrink every logit by about sqrt(K) and leave the teacher's softmax uniform.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        normalize_output: bool = True,
    ) -> None:
        """Create the head (trunc-normal 0.02 MLP weights, zero biases).

        Args:
            in_dim: Backbone width D.
            out_dim: Output width (65536 in the recipe).
            hidden_dim: MLP hidden width.
            bottleneck_dim: Width before the last layer.
            normalize_output: L2-normalise the output (FaceGCD/GCD: True; DINO pretraining: False).
        """
        super().__init__()
        self.normalize_output = normalize_output
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project features.

        Args:
            x: Backbone features (N, D).

        Returns:
            (N, out_dim) projections, L2-normalised when ``normalize_output``.
        """
        x = self.last_layer(F.normalize(self.mlp(x), dim=-1))
        return F.normalize(x, dim=-1) if self.normalize_output else x
