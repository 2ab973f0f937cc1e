"""Diagnostic figures: t-SNE of features and training curves from ``summary.csv``.

Figures are drawn with matplotlib's object-oriented API (``Figure`` renders with Agg), so no global backend is set.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

TSNE_MAX_POINTS = 2000
CURVE_COLUMNS = ("epoch", "train_loss", "eval_all_acc", "eval_old_acc", "eval_new_acc")


def plot_tsne(
    features: torch.Tensor,
    known_mask: torch.Tensor,
    out_png: str | Path,
    *,
    max_points: int = TSNE_MAX_POINTS,
    seed: int = 0,
    title: str = "t-SNE of test features",
) -> Path:
    """2-D t-SNE of (a random subsample of) the features, coloured known / unknown identity.

    Args:
        features: (n, D) features.
        known_mask: (n,) bool, True for samples of known identities.
        out_png: output image path.
        max_points: subsample size cap (t-SNE is quadratic in it).
        seed: subsampling and t-SNE seed.
        title: figure title.

    Returns:
        The written path.
    """
    from sklearn.manifold import TSNE  # heavy import, only needed here

    n = features.shape[0]
    if n < 3 or known_mask.shape != (n,):
        raise ValueError(
            f"t-SNE needs at least 3 points and a mask of length n; got {n} points and mask "
            f"{tuple(known_mask.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(n, generator=gen)[:max_points].sort().values
    x = features[keep].float().cpu().numpy()
    known = known_mask[keep].cpu().numpy().astype(bool)
    perplexity = float(min(30.0, (x.shape[0] - 1) / 3.0))
    emb = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.scatter(emb[~known, 0], emb[~known, 1], s=4, c="tab:orange", label=f"unknown ({int((~known).sum())})")
    ax.scatter(emb[known, 0], emb[known, 1], s=4, c="tab:blue", label=f"known ({int(known.sum())})")
    ax.set_title(f"{title} ({x.shape[0]} of {n} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=3)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    logger.info("wrote %s", out_png)
    return out_png


def plot_training_curves(summary_csv_path: str | Path, out_png: str | Path) -> Path:
    """Training loss and validation All / Old / New accuracy over epochs.

    Args:
        summary_csv_path: ``summary.csv`` with at least the columns epoch, train_loss, eval_all_acc, eval_old_acc,
            eval_new_acc (others are ignored).
        out_png: output image path.

    Returns:
        The written path.
    """
    summary_csv_path = Path(summary_csv_path)
    with summary_csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CURVE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{summary_csv_path} lacks the column(s) {', '.join(missing)}; expected {', '.join(CURVE_COLUMNS)}"
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{summary_csv_path} has no data row")
    cols = {c: np.array([float(r[c]) if r[c] not in ("", None) else np.nan for r in rows]) for c in CURVE_COLUMNS}

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(cols["epoch"], cols["train_loss"], marker="o", color="tab:red")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_title("training loss")
    for key, name in (("eval_all_acc", "All"), ("eval_old_acc", "Old"), ("eval_new_acc", "New")):
        validated = np.isfinite(cols[key])  # epochs without validation have empty cells
        ax_acc.plot(cols["epoch"][validated], cols[key][validated], marker="o", label=name)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("clustering accuracy")
    ax_acc.set_title("validation accuracy")
    ax_acc.legend(loc="best")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    logger.info("wrote %s", out_png)
    return out_png
