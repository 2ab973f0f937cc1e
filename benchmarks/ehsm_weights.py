"""TransFace's EHSM weights against the per-sample loss: do the samples EHSM calls hard (little spread over their gated
tokens' channels, a weight near 2) carry the larger margin-softmax loss?

Loads a ``--method recognition`` checkpoint of a ``transface_vit_*`` (trained with or without ``--ehsm``), rebuilds its
training set from the checkpoint's data settings and, in evaluation mode, computes for every training image the EHSM
weight w = 1 + exp(-gamma * mean of the top-K token stds) (the checkpoint's gamma and K) and its margin-softmax
cross-entropy over all the class centres (the checkpoint's Partial FC and head, one sample at a time, so each loss is
that sample's alone). Reports the distribution of w, the Spearman rank correlation of w with the loss, and the mean
loss of the quarter of the images with the largest weights against the quarter with the smallest; writes a PNG
(histogram of w, w against the loss) beside ``--output``'s JSON, or ``ehsm_weights.png`` in the working folder.

Usage (from the repository root; the checkpoint of ``shell/transface_ablation.sh``'s EHSM arm):
    python -m benchmarks.ehsm_weights --checkpoint-weights output/transface_ablation/ehsm_seed1/last.pth.tar
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from benchmarks.common import add_common_args, cli_main, environment, save_results, setup
from data_loader.recognition import identity_training_set
from model.ehsm import ehsm_weights
from model.recognition import recognizer_from_checkpoint
from model.transface_vit import TransFaceViT
from utils.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger("benchmarks.ehsm_weights")


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the analysis."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--checkpoint-weights", required=True, help="a transface_vit recognition checkpoint")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward (default: %(default)s)")
    parser.add_argument("--png", default=None, help="figure path (default: beside --output, or ehsm_weights.png)")
    add_common_args(parser, device=False, threads_default=1)
    return parser


@torch.no_grad()
def weights_and_losses(checkpoint: str | Path, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(w, loss) of every training image of ``checkpoint``'s run, in evaluation mode on the CPU."""
    ckpt = load_checkpoint(checkpoint, weights_only=True)
    model = recognizer_from_checkpoint(ckpt, checkpoint).eval()
    if not isinstance(model.backbone, TransFaceViT):
        raise ValueError(f"{checkpoint}: --arch {model.cfg.arch} is not a TransFace backbone (transface_vit_*)")
    data_cfg = ckpt["data_config"]
    data = identity_training_set(
        data_cfg["dataset"], data_cfg["data_path"], int(data_cfg["image_size"]), data_cfg["input_preset"]
    )
    torch.manual_seed(0)  # the training transform's flips
    weights, losses = [], []
    for batch in DataLoader(data.train, batch_size=batch_size, shuffle=False):
        images, labels = batch[0], batch[1].long()
        outputs = model.backbone.forward_with_tokens(images)
        weights.append(ehsm_weights(outputs.token_std, model.cfg.ehsm_gamma, model.cfg.ehsm_topk))
        losses.append(
            torch.stack(
                [model.partial_fc(outputs.embedding[i : i + 1], labels[i : i + 1])["loss"] for i in range(len(labels))]
            )
        )
    return torch.cat(weights).numpy(), torch.cat(losses).numpy()


def summarise(w: np.ndarray, loss: np.ndarray) -> dict:
    """Distribution of w, its rank correlation with the loss, and the loss of the top and bottom quarters by w."""
    order = np.argsort(w)
    quarter = max(len(w) // 4, 1)
    rho, p_value = spearmanr(w, loss)
    return {
        "images": int(len(w)),
        "w_mean": float(w.mean()),
        "w_quantiles_5_50_95": [float(q) for q in np.quantile(w, [0.05, 0.5, 0.95])],
        "spearman_w_loss": float(rho),
        "spearman_p_value": float(p_value),
        "loss_of_largest_w_quarter": float(loss[order[-quarter:]].mean()),
        "loss_of_smallest_w_quarter": float(loss[order[:quarter]].mean()),
    }


def plot(w: np.ndarray, loss: np.ndarray, summary: dict, out_png: Path) -> None:
    """Histogram of the weights and the weights against the per-sample loss."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_hist, ax_scatter = fig.subplots(1, 2)
    ax_hist.hist(w, bins=40, color="tab:purple")
    ax_hist.set_xlabel("EHSM weight w")
    ax_hist.set_ylabel("images")
    ax_hist.set_title(f"w over {summary['images']} training images")
    ax_scatter.scatter(w, loss, s=6, alpha=0.5)
    ax_scatter.set_xlabel("EHSM weight w")
    ax_scatter.set_ylabel("per-sample margin-softmax loss")
    ax_scatter.set_title(f"Spearman rho = {summary['spearman_w_loss']:.3f}")
    fig.savefig(out_png, dpi=120)
    logger.info("wrote %s", out_png)


def main(args: argparse.Namespace) -> int:
    """Compute, summarise, plot and save."""
    setup(args.threads)
    w, loss = weights_and_losses(args.checkpoint_weights, args.batch_size)
    summary = summarise(w, loss)
    out_png = Path(args.png or (Path(args.output).with_suffix(".png") if args.output else "ehsm_weights.png"))
    plot(w, loss, summary, out_png)
    env = environment(torch.device("cpu"), {"numpy": np.__version__})
    save_results({"args": vars(args), "environment": env, "results": summary}, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(get_args_parser(), main, (ValueError, CheckpointError, FileNotFoundError)))
