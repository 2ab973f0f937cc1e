"""ROC curves and TAR@FAR for face verification, a ROC figure and a markdown table.

``roc_curve`` sorts the scores once and gives the points of ``sklearn.metrics.roc_curve``: the first point is (0, 0)
with threshold +inf, then for every distinct score s, taken from the highest down, the point (FPR, TPR) of the rule
"accept when score >= s"; tied scores enter together. With ``drop_intermediate=True`` (the default, as sklearn's)
the points inside a straight run of equal steps are dropped: of the distinct-score points, the first, the last and
every point where the step in (false positives, true positives) changes are kept. ``drop_intermediate=False`` keeps
every point: the exact ROC.

``tar_at_far`` follows insightface (``recognition/_evaluation_/ijb/ijb_11.py``, ``eval_ijbc.py``): the TAR reported
at a target FAR is the TPR of the ROC point whose FPR is closest to the target, with no interpolation. insightface
reverses the curve (``np.flipud``, "select largest tpr at same fpr") before taking the first minimum (``np.argmin``),
so among points at the same distance the one latest on the curve wins: the largest TPR, at the larger FPR when two
FPRs are equally close. insightface calls sklearn with its default ``drop_intermediate=True``, and so does our
default, which reproduces its numbers exactly. On the exact ROC a target inside a horizontal run finds its own FPR
there; on the thinned one only the run's ends remain, so the closest point can move to the next vertical step and
report a higher TAR.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PLOT_POINTS = 4000

ScoreLike = torch.Tensor | np.ndarray | Sequence[float]


@dataclass(frozen=True)
class RocCurve:
    """One ROC curve: ``fpr``, ``tpr`` and ``thresholds`` (float64, same length, thresholds decreasing).

    Point i is the rule "accept when score >= thresholds[i]"; point 0 is (0, 0) at threshold +inf.
    ``num_positive`` and ``num_negative`` count the genuine and impostor pairs.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    num_positive: int
    num_negative: int

    def auc(self) -> float:
        """Area under the curve (trapezoidal rule over the points)."""
        return float(np.trapezoid(self.tpr, self.fpr))


def _as_array(values: ScoreLike, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def roc_curve(scores: ScoreLike, labels: ScoreLike, *, drop_intermediate: bool = True) -> RocCurve:
    """ROC of similarity scores (higher = more alike) against genuine (1 / True) and impostor (0 / False) labels.

    One sort (numpy's vectorised sort, on the CPU); the points equal ``sklearn.metrics.roc_curve(labels, scores,
    drop_intermediate=drop_intermediate)``.

    Args:
        scores: (n,) similarity scores, finite.
        labels: (n,) 0/1 or bool labels, 1 = genuine pair.
        drop_intermediate: drop the points inside straight runs of equal steps, as sklearn's default; False keeps
            every point (the exact ROC).

    Returns:
        The ``RocCurve``.
    """
    score_values = _as_array(scores, "scores")
    label_values = _as_array(labels, "labels")
    if score_values.shape != label_values.shape:
        raise ValueError(
            f"scores and labels must have the same length, got {score_values.shape[0]} and {label_values.shape[0]}"
        )
    if not (np.issubdtype(score_values.dtype, np.floating) and np.isfinite(score_values).all()):
        raise ValueError("scores must be finite floating-point values")
    if label_values.dtype != bool:
        if ((label_values != 0) & (label_values != 1)).any():
            raise ValueError("labels must be 0/1 integers or booleans (1 = genuine pair)")
        label_values = label_values.astype(bool)
    num_positive = int(label_values.sum())
    num_negative = label_values.size - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"a ROC needs genuine and impostor pairs, got {num_positive} genuine and {num_negative} impostor"
        )
    order = np.argsort(score_values)[::-1]
    sorted_scores = score_values[order]
    # The last position of every run of tied scores: the rule "score >= s" accepts the whole run at once.
    last = np.append(np.flatnonzero(np.diff(sorted_scores)), score_values.size - 1)
    tps = np.cumsum(label_values[order], dtype=np.int64)[last]
    fps = last + 1 - tps
    thresholds = sorted_scores[last].astype(np.float64)
    if drop_intermediate and len(tps) > 2:
        # sklearn: keep the ends and every point where the step in (fps, tps) changes.
        keep = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps].astype(np.float64), np.r_[0, fps].astype(np.float64)
    return RocCurve(fps / num_negative, tps / num_positive, np.r_[np.inf, thresholds], num_positive, num_negative)


def closest_point_index(curve: RocCurve, far: float) -> int:
    """Index of the ROC point whose FPR is closest to ``far``; of equally close points, the last one on the curve.

    This is insightface's ``np.argmin(abs(fpr - far))`` on the reversed curve.
    """
    distance = np.abs(curve.fpr - far)
    return len(distance) - 1 - int(np.argmin(distance[::-1]))


def tar_at_far(
    scores: ScoreLike | RocCurve,
    labels: ScoreLike | None = None,
    fars: Sequence[float] = DEFAULT_FARS,
    *,
    drop_intermediate: bool = True,
) -> dict[float, float]:
    """TAR (TPR) at each target FAR: the TPR of the ROC point with the closest FPR (insightface's rule, see above).

    Args:
        scores: (n,) similarity scores, or a ``RocCurve`` already computed (then ``labels`` must be None).
        labels: (n,) genuine (1) / impostor (0) labels.
        fars: target false accept rates.
        drop_intermediate: passed to ``roc_curve`` (True, the default, is insightface's rule; False the exact ROC).

    Returns:
        {far: tar} in the order of ``fars``.
    """
    if isinstance(scores, RocCurve):
        if labels is not None:
            raise ValueError("tar_at_far: pass either a RocCurve or scores and labels, not a curve and labels")
        curve = scores
    else:
        if labels is None:
            raise ValueError("tar_at_far: labels are required with scores")
        curve = roc_curve(scores, labels, drop_intermediate=drop_intermediate)
    for far in fars:
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"tar_at_far: target FARs must lie in [0, 1], got {far}")
    return {float(far): float(curve.tpr[closest_point_index(curve, far)]) for far in fars}


def far_label(far: float) -> str:
    """``1e-4`` for powers of ten, else ``%g``: the FAR spelling of tables and JSON keys."""
    exponent = math.log10(far) if far > 0 else float("nan")
    return f"1e{int(round(exponent))}" if far > 0 and abs(exponent - round(exponent)) < 1e-9 else f"{far:g}"


def format_tar_table(results: Mapping[str, Mapping[float, float]], *, percent: bool = True, digits: int = 2) -> str:
    """Markdown table with one row per method and one column per target FAR.

    Args:
        results: {method: {far: tar}} as returned by ``tar_at_far``; every method must have the same FARs.
        percent: print TAR in percent (insightface's tables do).
        digits: decimals printed.

    Returns:
        The table as text (header, separator, one line per method).
    """
    if not results:
        raise ValueError("format_tar_table: no methods given")
    fars = list(next(iter(results.values())))
    for method, row in results.items():
        if list(row) != fars:
            raise ValueError(f"format_tar_table: method {method!r} has FARs {list(row)}, expected {fars}")
    scale = 100.0 if percent else 1.0
    header = "| Method | " + " | ".join(f"TAR@FAR={far_label(far)}" for far in fars) + " |"
    lines = [header, "|---|" + "---:|" * len(fars)]
    for method, row in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{scale * row[far]:.{digits}f}" for far in fars) + " |")
    return "\n".join(lines) + "\n"


def _plot_points(curve: RocCurve, lowest_far: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve's points with FPR > 0; a long curve is thinned to the last point at or before each of
    ``PLOT_POINTS`` log-spaced FPRs (the highest TPR there), so millions of pairs still plot quickly."""
    if len(curve.fpr) <= PLOT_POINTS:
        index = np.flatnonzero(curve.fpr > 0)
    else:
        grid = np.geomspace(min(lowest_far, 1.0) / 10, 1.0, PLOT_POINTS)
        index = np.unique(np.searchsorted(curve.fpr, grid, side="right") - 1)
        index = index[curve.fpr[index] > 0]
    return curve.fpr[index], curve.tpr[index]


def plot_roc(
    curves: Mapping[str, RocCurve],
    out_png: str | Path,
    *,
    title: str = "ROC",
    fars: Sequence[float] = DEFAULT_FARS,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """ROC curves of several methods on one log-FAR axis (insightface's IJB figure layout), written as PNG.

    Args:
        curves: {method: RocCurve}; each is labelled with its AUC.
        out_png: output image path.
        title: figure title.
        fars: FAR ticks; the x axis spans their range.
        ylim: TAR axis range (default: from the lowest TAR shown to 1).

    Returns:
        The written path.
    """
    if not curves:
        raise ValueError("plot_roc: no curves given")
    lo, hi = min(fars), max(fars)
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    shown_min = 1.0
    for method, curve in curves.items():
        fpr, tpr = _plot_points(curve, lo)
        ax.plot(fpr, tpr, lw=1, label=f"{method} (AUC = {100 * curve.auc():.2f}%)")
        in_range = (fpr >= lo) & (fpr <= hi)
        if in_range.any():
            shown_min = min(shown_min, float(tpr[in_range].min()))
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xticks(list(fars))
    ax.set_ylim(*(ylim or (max(0.0, math.floor(shown_min * 10) / 10), 1.0)))
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(title)
    ax.grid(linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right", fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    logger.info("wrote %s", out_png)
    return out_png
