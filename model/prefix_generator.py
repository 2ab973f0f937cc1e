"""HyperNetwork prefix generator (FaceGCD; docs/method.md, sections 5.4 and 5.5).

References:
    - FaceGCD: Generalized Face Discovery via Dynamic Prefix Generation (Oh & Choi, BMVC 2025), arXiv 2507.22353;
      module names follow the authors' release (`prefix_generator.*`) so its checkpoints load.
    - HyperNetworks (Ha, Dai & Le, ICLR 2017).
"""

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

INITIALIZERS = ("uniform", "zero")
EVAL_PROMPTS = ("fixed", "resample")


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with normal(std 0.01) weight and zero bias, the reference HyperNet init."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class PrefixHyperNet(nn.Module):
    """Emits a per-layer, per-image Linear(in_features -> out_features): weight (out, in) and bias (out).

    Plain variant: input h_l = gamma * s_l + beta, the affine part of its own `layer_norm` applied to the
    z-normalised token mean s_l (equal to mean_t LN(E_l)). Layer-embed variant: h_l = [u_l ; layer_embedding[l]].
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        in_features: int,
        out_features: int,
        *,
        layer_embed: bool = False,
        hidden_dim: int = 1024,
    ) -> None:
        """Create the HyperNet.

        Args:
            embed_dim: ViT width D (size of the conditioning vector).
            depth: Number of ViT layers (layer-embedding rows).
            in_features: Input width of the generated Linear.
            out_features: Output width of the generated Linear.
            layer_embed: Concatenate a learned layer embedding instead of the input LayerNorm.
            hidden_dim: Hidden width of the weight and bias generators.
        """
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layer_embed = layer_embed
        if layer_embed:
            self.layer_embedding = nn.Embedding(depth, embed_dim)
            d_in = 2 * embed_dim
        else:
            self.layer_norm = nn.LayerNorm(embed_dim)
            d_in = embed_dim
        self.weight_generator = nn.Sequential(
            _linear(d_in, hidden_dim), nn.ReLU(), _linear(hidden_dim, out_features * in_features)
        )
        self.bias_generator = nn.Sequential(_linear(d_in, hidden_dim), nn.ReLU(), _linear(hidden_dim, out_features))

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate weights and biases for every layer and image in one batched call.

        Args:
            cond: Pooled conditioning (depth, B, D): z-normalised means (plain) or plain means (layer-embed).

        Returns:
            weight (depth, B, out, in) and bias (depth, B, out).
        """
        depth, batch, _ = cond.shape
        if self.layer_embed:
            layer = self.layer_embedding.weight[:depth, None, :].expand(-1, batch, -1)
            h = torch.cat([cond, layer.to(cond.dtype)], dim=-1)
        else:
            h = torch.addcmul(self.layer_norm.bias, cond, self.layer_norm.weight)
        h = h.reshape(depth * batch, -1)
        weight = self.weight_generator(h).view(depth, batch, self.out_features, self.in_features)
        bias = self.bias_generator(h).view(depth, batch, self.out_features)
        return weight, bias


class PrefixGenerator(nn.Module):
    """Per-image key/value prefixes for every layer from the frozen conditioning pass.

    For each layer l and kind (key, value): P_l = LN_e(W_up,l ReLU(W_down,l z + b_down,l) + b_up,l) applied to
    every e-vector z of the base prompt Z (B, P, H, e), with (W, b) emitted by the HyperNets. The base prompt is
    fresh U(-1, 1) per forward in training (independent per sample and for K and V, shared by the layers), zeros
    with `initializer="zero"`, and in evaluation the fixed buffers `eval_prompt_key`/`eval_prompt_value` (P, H, e)
    drawn once from `seed` (`eval_prompt="resample"` draws fresh ones as the reference did).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        depth: int,
        prefix_length: int,
        layer_embed: bool = False,
        initializer: str = "uniform",
        eval_prompt: str = "fixed",
        seed: int = 0,
        hidden_dim: int = 1024,
        bottleneck_dim: int = 16,
    ) -> None:
        """Create the generator.

        Args:
            embed_dim: ViT width D.
            num_heads: Attention heads H (head width e = D / H).
            depth: ViT depth (number of prefixed layers).
            prefix_length: Prefix length P (> 0).
            layer_embed: Use the layer-embedding HyperNet variant (`--layer-embed`).
            initializer: Base prompt: "uniform" (U(-1, 1)) or "zero".
            eval_prompt: Evaluation prompt: "fixed" (seeded buffers) or "resample" (reference behaviour).
            seed: Seed of the fixed evaluation prompt.
            hidden_dim: HyperNet hidden width.
            bottleneck_dim: Width r of the per-image e -> r -> e prompt MLP.
        """
        super().__init__()
        if prefix_length <= 0:
            raise ValueError(f"prefix_length must be > 0 for a PrefixGenerator, got {prefix_length}")
        if initializer not in INITIALIZERS:
            raise ValueError(f"initializer {initializer!r} not supported; expected one of {INITIALIZERS}")
        if eval_prompt not in EVAL_PROMPTS:
            raise ValueError(f"eval_prompt {eval_prompt!r} not supported; expected one of {EVAL_PROMPTS}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.depth = depth
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.prefix_length = prefix_length
        self.initializer = initializer
        self.eval_prompt = eval_prompt
        self.seed = seed
        e, r = self.head_dim, bottleneck_dim

        self.prefix_layer_norm = nn.LayerNorm(e)
        net = dict(embed_dim=embed_dim, depth=depth, layer_embed=layer_embed, hidden_dim=hidden_dim)
        self.key_down_prefix_hypernet = PrefixHyperNet(in_features=e, out_features=r, **net)
        self.key_up_prefix_hypernet = PrefixHyperNet(in_features=r, out_features=e, **net)
        self.value_down_prefix_hypernet = PrefixHyperNet(in_features=e, out_features=r, **net)
        self.value_up_prefix_hypernet = PrefixHyperNet(in_features=r, out_features=e, **net)

        key, value = self._draw_eval_prompts()
        self.register_buffer("eval_prompt_key", key)
        self.register_buffer("eval_prompt_value", value)

    def _draw_eval_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed evaluation prompts (P, H, e), drawn from a generator seeded with `seed`."""
        shape = (self.prefix_length, self.num_heads, self.head_dim)
        if self.initializer == "zero":
            return torch.zeros(shape), torch.zeros(shape)
        gen = torch.Generator().manual_seed(self.seed)
        prompts = torch.rand((2, *shape), generator=gen) * 2 - 1
        return prompts[0].clone(), prompts[1].clone()

    def reset_eval_prompts(self) -> None:
        """Redraw the fixed evaluation prompts from `seed` (for checkpoints that lack them)."""
        key, value = self._draw_eval_prompts()
        self.eval_prompt_key.copy_(key)
        self.eval_prompt_value.copy_(value)

    def base_prompts(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Base prompts for keys and values.

        Args:
            batch_size: Number of images B.
            device: Device of the conditioning tensors.

        Returns:
            (2, B, P*H, e), or (2, 1, P*H, e) when shared by the whole batch.
        """
        n, e = self.prefix_length * self.num_heads, self.head_dim
        if self.initializer == "zero":
            return torch.zeros(2, 1, n, e, device=device)
        if self.training or self.eval_prompt == "resample":
            return torch.rand(2, batch_size, n, e, device=device) * 2 - 1
        return torch.stack([self.eval_prompt_key, self.eval_prompt_value]).view(2, 1, n, e)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Generate the prefixes.

        Args:
            cond: Pooled conditioning pass (depth, B, D).

        Returns:
            Prefixes (depth, 2, B, H, P, e) (keys then values), in the autocast dtype under autocast.
        """
        depth, batch, _ = cond.shape
        if depth != self.depth:
            raise ValueError(f"conditioning covers {depth} layers, the generator expects {self.depth}")
        prompts = self.base_prompts(batch, cond.device)
        nets = (
            (self.key_down_prefix_hypernet, self.key_up_prefix_hypernet),
            (self.value_down_prefix_hypernet, self.value_up_prefix_hypernet),
        )
        prefixes = []
        for prompt, (down_net, up_net) in zip(prompts, nets):
            w_down, b_down = down_net(cond)  # (depth, B, r, e), (depth, B, r)
            w_up, b_up = up_net(cond)  # (depth, B, e, r), (depth, B, e)
            z = prompt.to(w_down.dtype).unsqueeze(0)  # (1, B or 1, P*H, e)
            mid = F.relu(torch.matmul(z, w_down.transpose(-1, -2)) + b_down.unsqueeze(2))  # (depth, B, P*H, r)
            out = torch.matmul(mid, w_up.transpose(-1, -2)) + b_up.unsqueeze(2)  # (depth, B, P*H, e)
            prefixes.append(self.prefix_layer_norm(out))
        out = torch.stack(prefixes, dim=1)  # (depth, 2, B, P*H, e)
        out = out.view(depth, 2, batch, self.prefix_length, self.num_heads, self.head_dim).transpose(3, 4)
        if torch.is_autocast_enabled(out.device.type):
            out = out.to(torch.get_autocast_dtype(out.device.type))
        return out
