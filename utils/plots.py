"""Diagnostic figures: t-SNE of features, and training curves from ``summary.csv`` (loss, DINO diagnostics, accuracy).

Figures are drawn with matplotlib's object-oriented API (``Figure`` renders with Agg), so no global backend is set.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

logger = logging.getLogger(__name__)

TSNE_MAX_POINTS = 2000
REQUIRED_CURVE_COLUMNS = ("epoch", "train_loss")
TEACHER_ENTROPY_COLUMN = "train_teacher_entropy"
# DINO / LAFS collapse diagnostics, one panel each when summary.csv has values: (column, y label, title, colour)
DIAGNOSTIC_PANELS = (
    (TEACHER_ENTROPY_COLUMN, "entropy (nats)", "teacher softmax entropy", "tab:purple"),
    ("train_teacher_feature_cosine", "mean pairwise cosine", "teacher features' mean cosine", "tab:brown"),
)
ACCURACY_CURVES = (("eval_all_acc", "All"), ("eval_old_acc", "Old"), ("eval_new_acc", "New"))
OPTIONAL_CURVE_COLUMNS = (*(panel[0] for panel in DIAGNOSTIC_PANELS), *(key for key, _ in ACCURACY_CURVES))


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


def _read_curves(summary_csv_path: Path) -> dict[str, np.ndarray]:
    """The curve columns of ``summary.csv`` as float arrays (empty cells -> NaN); optional ones only when present."""
    with summary_csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        fieldnames = reader.fieldnames or []
        missing = [c for c in REQUIRED_CURVE_COLUMNS if c not in fieldnames]
        if missing:
            raise ValueError(
                f"{summary_csv_path} lacks the column(s) {', '.join(missing)}; expected at least "
                f"{', '.join(REQUIRED_CURVE_COLUMNS)} (optional: {', '.join(OPTIONAL_CURVE_COLUMNS)})"
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{summary_csv_path} has no data row")
    columns = [*REQUIRED_CURVE_COLUMNS, *(c for c in OPTIONAL_CURVE_COLUMNS if c in fieldnames)]
    curves = {}
    for c in columns:
        values = []
        for line, row in enumerate(rows, start=2):
            cell = row[c]
            try:
                values.append(float(cell) if cell not in ("", None) else np.nan)
            except ValueError as err:
                raise ValueError(f"{summary_csv_path} line {line}: column {c} holds {cell!r}, not a number") from err
        curves[c] = np.array(values)
    return curves


def _plot_finite(ax, x: np.ndarray, y: np.ndarray, **kwargs) -> None:
    """Plot the points of a curve that have a value (epochs without one have empty cells)."""
    keep = np.isfinite(y)
    ax.plot(x[keep], y[keep], marker="o", **kwargs)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_training_curves(summary_csv_path: str | Path, out_png: str | Path) -> Path:
    """Training loss, DINO's collapse diagnostics and validation All / Old / New accuracy over epochs.

    The loss panel is always drawn. A panel per diagnostic of ``DIAGNOSTIC_PANELS`` follows when ``summary.csv`` has
    its column with values (DINO / LAFS runs: the teacher's softmax entropy and its features' mean pairwise cosine),
    and an accuracy panel when some eval accuracy has a value; a run that never validated (no eval columns, or only
    empty cells) says so in the figure title.

    Args:
        summary_csv_path: ``summary.csv`` with at least the columns epoch and train_loss; eval_all_acc,
            eval_old_acc, eval_new_acc and the diagnostic columns are drawn when present (others are ignored).
        out_png: output image path.

    Returns:
        The written path.
    """
    summary_csv_path = Path(summary_csv_path)
    cols = _read_curves(summary_csv_path)
    epochs = cols["epoch"]
    diagnostics = [panel for panel in DIAGNOSTIC_PANELS if panel[0] in cols and np.isfinite(cols[panel[0]]).any()]
    accuracies = [(key, name) for key, name in ACCURACY_CURVES if key in cols and np.isfinite(cols[key]).any()]

    panels = 1 + len(diagnostics) + int(bool(accuracies))
    fig = Figure(figsize=(5.5 * panels, 4), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False).ravel())
    ax_loss = axes.pop(0)
    _plot_finite(ax_loss, epochs, cols["train_loss"], color="tab:red")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_title("training loss")
    for column, ylabel, title, colour in diagnostics:
        ax = axes.pop(0)
        _plot_finite(ax, epochs, cols[column], color=colour)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    if accuracies:
        ax_acc = axes.pop(0)
        for key, name in accuracies:
            _plot_finite(ax_acc, epochs, cols[key], label=name)
        ax_acc.set_ylabel("clustering accuracy")
        ax_acc.set_title("validation accuracy")
        ax_acc.legend(loc="best")
    else:
        fig.suptitle(f"no validation values in {summary_csv_path.name}: this run has no clustering validation")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    logger.info("wrote %s", out_png)
    return out_png


def plot_collapse_curves(runs: dict[str, tuple[Path, float]], out_png: str | Path) -> Path:
    """DINO/LAFS collapse signs of several runs side by side: teacher entropy / log K and the features' mean cosine.

    Args:
        runs: label -> (the run's ``summary.csv``, log of its prototype count K).
        out_png: the figure's path.

    Returns:
        ``out_png``.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    entropy_ax, cosine_ax = fig.subplots(1, 2)
    for label, (summary_csv, log_k) in runs.items():
        curves = _read_curves(Path(summary_csv))
        for ax, column, scale in (
            (entropy_ax, TEACHER_ENTROPY_COLUMN, log_k),
            (cosine_ax, DIAGNOSTIC_PANELS[1][0], 1.0),
        ):
            if column not in curves:
                raise ValueError(f"{summary_csv} has no {column} column: not a DINO/LAFS run")
            _plot_finite(ax, curves["epoch"], curves[column] / scale, label=label)
    entropy_ax.set(ylabel="entropy / log K", title="teacher softmax entropy (1: uniform, 0: one prototype)")
    entropy_ax.set_ylim(0, 1.05)
    cosine_ax.set(ylabel="mean pairwise cosine", title="teacher CLS features' mean cosine (1: one direction)")
    cosine_ax.legend(fontsize=7)
    fig.savefig(out_png, dpi=110)
    return Path(out_png)
