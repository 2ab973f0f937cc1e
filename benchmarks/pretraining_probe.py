"""Whether a pretrained ViT's features separate identities it never saw: the probe of the pretraining search.

For each feature source, on every image of ``<data>/test/<identity>/`` (held-out identities; evaluation transform of
the preset):

- leave-one-out 1-NN identity accuracy under cosine similarity, of the raw CLS features and of the centred ones
  (each set's mean subtracted: the final LayerNorm gives every CLS feature a common component);
- k-means accuracy: plain k-means (k = the number of identities, 10 restarts) on the L2-normalised centred features,
  scored with the Hungarian matching;
- the mean pairwise cosine of the raw features (near 1: they all point one way).

Sources: ``pixels`` (the normalised image, flattened), ``random`` (a randomly initialised ViT, ``--seed``) and any
checkpoint ``--pretrained-weights`` accepts (a DINO/LAFS ``checkpoint.pth``: its teacher; a recognition checkpoint).

With ``--curves PNG``, the teacher entropy (as a fraction of log K) and the features' mean cosine of every DINO/LAFS
checkpoint's run (the ``summary.csv`` beside it) are drawn side by side.

    python -m benchmarks.pretraining_probe pixels random output/pretraining_search/dino_k256/checkpoint.pth \\
        --data data/synthfaces_quick --arch vit_tiny --patch-size 16 --img-size 48 --preset face --json probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder

from benchmarks.prefix_effect import nearest_neighbour_accuracy
from data_loader.transforms import EvalTransform
from model.dino import mean_pairwise_cosine
from model.vit import BACKBONE_ARCHS, create_backbone, load_pretrained_backbone
from utils.checkpoint import atomic_write_text, load_checkpoint
from utils.evaluation.clustering import cluster_acc
from utils.kmeans import kmeans
from utils.plots import plot_collapse_curves
from utils.presets import INPUT_PRESETS


def vit_features(
    images: torch.Tensor, arch: str, patch_size: int, weights: Path | None, seed: int, batch: int = 200
) -> torch.Tensor:
    """CLS features (after the final norm) of a ViT, random (seeded) or loaded from ``weights``."""
    torch.manual_seed(seed)
    backbone = create_backbone(arch, patch_size=patch_size, img_size=images.shape[-1])
    if weights is not None:
        load_pretrained_backbone(backbone, weights, "teacher")
    backbone.eval()
    with torch.no_grad():
        return torch.cat([backbone(chunk) for chunk in images.split(batch)])


def probe(features: torch.Tensor, labels: torch.Tensor, kmeans_restarts: int = 10) -> dict[str, float]:
    """The probe's measurements of one feature set (see the module docstring)."""
    centred = features - features.mean(dim=0)
    k = int(labels.unique().numel())
    fit = kmeans(F.normalize(centred, dim=1), k, n_init=kmeans_restarts, seed=0, progress=False)
    return {
        "nn_raw": nearest_neighbour_accuracy(features, labels),
        "nn_centred": nearest_neighbour_accuracy(centred, labels),
        "kmeans_acc": cluster_acc(labels.numpy(), fit.labels.numpy()),
        "mean_pairwise_cosine": mean_pairwise_cosine(features).item(),
    }


def main(argv: list[str] | None = None) -> int:
    """Probe every source and print one table (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="'pixels', 'random' or checkpoint paths")
    parser.add_argument("--data", type=Path, required=True, help="a benchmark folder with test/<identity>/ images")
    parser.add_argument("--arch", choices=BACKBONE_ARCHS, default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--preset", choices=sorted(INPUT_PRESETS), default="face", help="input normalisation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ViT")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--curves", type=Path, help="draw the DINO/LAFS runs' collapse curves into this PNG")
    args = parser.parse_args(argv)
    test_dir = args.data / "test"
    if not test_dir.is_dir():
        parser.error(f"--data {args.data}: no test/ folder of identity folders")
    for source in args.sources:
        if source not in ("pixels", "random") and not Path(source).is_file():
            parser.error(f"source {source!r} is neither 'pixels', 'random' nor an existing checkpoint file")
    test = ImageFolder(str(test_dir), transform=EvalTransform(args.img_size, args.preset))
    images = torch.stack([image for image, _ in test])
    labels = torch.tensor(test.targets)
    results = {}
    for source in args.sources:
        if source == "pixels":
            features = images.flatten(1)
        else:
            weights = None if source == "random" else Path(source)
            features = vit_features(images, args.arch, args.patch_size, weights, args.seed)
        results[source] = probe(features, labels)
    print(f"{len(test)} test images of {int(labels.unique().numel())} identities in {test_dir}")
    print(f"{'source':<60} {'1-NN raw':>9} {'1-NN ctr':>9} {'k-means':>8} {'cosine':>7}")
    for source, r in results.items():
        print(
            f"{source:<60} {100 * r['nn_raw']:9.1f} {100 * r['nn_centred']:9.1f} {100 * r['kmeans_acc']:8.1f} "
            f"{r['mean_pairwise_cosine']:7.3f}"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    if args.curves:
        runs = {}
        for source in args.sources:
            summary = Path(source).parent / "summary.csv"
            if source in ("pixels", "random") or not summary.is_file():
                continue
            stored = load_checkpoint(source).get("args") or {}
            runs[Path(source).parent.name] = (summary, math.log(stored.get("head_out_dim", 65536)))
        print(f"wrote {plot_collapse_curves(runs, args.curves)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
