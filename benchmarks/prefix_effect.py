"""How much a trained FaceGCD model's prefixes change what it computes, on a folder of test identities.

For every image of ``<data>/test/<identity>/`` (evaluation transform of the checkpoint's input preset), with the
fixed evaluation prompt:

- the share of attention that goes to the prefix tokens, per layer (mean over heads, queries and images);
- the cosine between each image's CLS feature with and without the prefixes (same weights, prefixes dropped), also
  after subtracting each set's mean feature (the final LayerNorm's common component can make every raw cosine ~1);
- the mean pairwise cosine of the features, with and without the prefixes (near 1: all features point one way);
- leave-one-out 1-NN identity accuracy of the features, with and without the prefixes.

    python -m benchmarks.prefix_effect output/claim/facegcd_s0/last.pth.tar data/synthfaces_quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder

from data_loader.transforms import EvalTransform
from model.dino import mean_pairwise_cosine
from model.facegcd import FaceGCD, ModelConfig, load_facegcd_checkpoint
from utils.checkpoint import load_checkpoint


def prefix_attention_share(model: FaceGCD, images: torch.Tensor) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Per-layer attention share of the prefixes, and the CLS features with and without them.

    Args:
        model: a FaceGCD model with a prefix generator, in eval mode.
        images: (N, 3, S, S).

    Returns:
        (share per layer, features with prefixes (N, D), features without (N, D)).
    """
    backbone = model.backbone
    tokens = backbone.embed_tokens(images)
    prefixes = model.prefixes(tokens)  # (depth, 2, N, H, P, e)
    shares, x = [], tokens
    for i, block in enumerate(backbone.blocks):
        attn = block.attn
        h = block.norm1(x)
        q, k, _ = attn.qkv(h).reshape(h.shape[0], h.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        prefix_k = prefixes[i, 0].to(q.dtype).expand(q.shape[0], -1, -1, -1)
        weights = ((q * attn.scale) @ torch.cat([prefix_k, k], dim=2).transpose(-2, -1)).softmax(dim=-1)
        shares.append(weights[..., : prefix_k.shape[2]].sum(dim=-1).mean().item())
        x = block(x, prefixes[i])
    with_prefix = backbone.forward_head(backbone.norm(x))
    without = backbone.forward_head(backbone.forward_tokens(tokens, None))
    return shares, with_prefix, without


def nearest_neighbour_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy under cosine similarity."""
    unit = F.normalize(features, dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2.0)
    return (labels[sims.argmax(dim=1)] == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    """Print the measurements of one checkpoint as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a FaceGCD training checkpoint (last.pth.tar)")
    parser.add_argument("data", type=Path, help="a benchmark folder with test/<identity>/ images")
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    model, _ = load_facegcd_checkpoint(args.checkpoint, ModelConfig())
    if model.conditioner is None:
        parser.error(f"{args.checkpoint} has no prefixes (--prefix-length 0)")
    preset = (ckpt.get("data_config") or {}).get("input_preset", "gcd")
    test = ImageFolder(str(args.data / "test"), transform=EvalTransform(model.cfg.img_size, preset))
    images = torch.stack([image for image, _ in test])
    labels = torch.tensor(test.targets)
    model.eval()
    with torch.no_grad():
        shares, with_prefix, without = prefix_attention_share(model, images)
    report = {
        "checkpoint": str(args.checkpoint),
        "images": len(test),
        "prefix_attention_share_per_layer": [round(s, 4) for s in shares],
        "cosine_with_vs_without_prefixes": F.cosine_similarity(with_prefix, without, dim=1).mean().item(),
        "centred_cosine_with_vs_without_prefixes": F.cosine_similarity(
            with_prefix - with_prefix.mean(dim=0), without - without.mean(dim=0), dim=1
        )
        .mean()
        .item(),
        "mean_pairwise_cosine": {
            "with": mean_pairwise_cosine(with_prefix).item(),
            "without": mean_pairwise_cosine(without).item(),
        },
        "nn_accuracy": {
            "with": nearest_neighbour_accuracy(with_prefix, labels),
            "without": nearest_neighbour_accuracy(without, labels),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
