"""Landmark figures: learned landmarks drawn on faces, and a face beside its landmark mosaic.

Figures are drawn with matplotlib's object-oriented API (``Figure`` renders with Agg), so no global backend is set.
Images are (3, S, S) tensors, either uint8 in [0, 255] or de-normalised floats in [0, 1].
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

MAX_IMAGES = 16
_RANGE_TOLERANCE = 1e-3


def _to_rgb(image: torch.Tensor, name: str) -> np.ndarray:
    """(3, H, W) uint8 or [0, 1] float tensor -> (H, W, 3) float array in [0, 1] for ``imshow``."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, H, W) image, got shape {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).float().numpy() / 255.0
    image = image.float()
    low, high = float(image.min()), float(image.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{name} has values in [{low:.3g}, {high:.3g}]; expected uint8 or floats in [0, 1] (undo the "
            f"normalisation first)"
        )
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_landmarks(
    images: torch.Tensor,
    coords: torch.Tensor,
    out_png: str | Path,
    true_points: torch.Tensor | None = None,
    *,
    max_images: int = MAX_IMAGES,
    title: str = "Learned landmarks",
) -> Path:
    """A grid of faces with their learned landmarks, and optionally their ground-truth points in another style.

    Args:
        images: (B, 3, S, S) uint8 or de-normalised float images.
        coords: (B, L, 2) learned landmark pixel coordinates (x, y).
        out_png: output image path.
        true_points: optional (B, K, 2) ground-truth points (x, y), e.g. the 5 alignment landmarks.
        max_images: how many of the first images to draw.
        title: figure title.

    Returns:
        The written path.
    """
    if images.dim() != 4 or coords.dim() != 3 or coords.shape[0] != images.shape[0] or coords.shape[-1] != 2:
        raise ValueError(
            f"images must be (B, 3, S, S) and coords (B, L, 2) with the same B; got {tuple(images.shape)} and "
            f"{tuple(coords.shape)}"
        )
    if true_points is not None and (
        true_points.dim() != 3 or true_points.shape[0] != images.shape[0] or true_points.shape[-1] != 2
    ):
        raise ValueError(
            f"true_points must be (B={images.shape[0]}, K, 2) points (x, y), got {tuple(true_points.shape)}"
        )
    n = min(images.shape[0], max_images)
    if n < 1:
        raise ValueError("plot_landmarks needs at least one image")
    height, width = images.shape[-2:]
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.4 * ncols, 2.4 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    points = coords.detach().float().cpu().numpy()
    truth = None if true_points is None else true_points.detach().float().cpu().numpy()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(_to_rgb(images[i], f"images[{i}]"), interpolation="nearest")
        ax.scatter(points[i, :, 0], points[i, :, 1], s=4, c="tab:red", label=f"learned ({points.shape[1]})")
        if truth is not None:
            ax.scatter(
                truth[i, :, 0], truth[i, :, 1], s=30, c="tab:cyan", marker="x", label=f"ground truth ({truth.shape[1]})"
            )
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), markerscale=2)
    fig.suptitle(f"{title} ({n} of {images.shape[0]} images)")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    logger.info("wrote %s", out_png)
    return out_png


def plot_mosaic(
    image: torch.Tensor,
    mosaic: torch.Tensor,
    out_png: str | Path,
    *,
    patch: int | None = None,
    coords: torch.Tensor | None = None,
) -> Path:
    """A face and its landmark mosaic side by side.

    Args:
        image: (3, S, S) uint8 or de-normalised float image.
        mosaic: (3, M, M) its mosaic, in the same value range.
        out_png: output image path.
        patch: tile side in pixels; when given, the tile borders are drawn on the mosaic.
        coords: optional (L, 2) landmark pixel coordinates (x, y) the mosaic was sampled at, drawn on the image.

    Returns:
        The written path.
    """
    if coords is not None and (coords.dim() != 2 or coords.shape[-1] != 2):
        raise ValueError(f"coords must be (L, 2) landmark (x, y) pairs, got shape {tuple(coords.shape)}")
    rgb = _to_rgb(image, "image")
    tiles = _to_rgb(mosaic, "mosaic")
    fig = Figure(figsize=(8, 4.3))
    left, right = fig.subplots(1, 2)
    left.imshow(rgb, interpolation="nearest")
    if coords is not None:
        points = coords.detach().float().cpu().numpy()
        left.scatter(points[:, 0], points[:, 1], s=4, c="tab:red")
        left.set_xlim(-0.5, rgb.shape[1] - 0.5)
        left.set_ylim(rgb.shape[0] - 0.5, -0.5)
    landmarks = "" if coords is None else f", {coords.shape[0]} landmarks"
    left.set_title(f"image ({rgb.shape[1]} x {rgb.shape[0]}{landmarks})")
    right.imshow(tiles, interpolation="nearest")
    right.set_title(f"landmark mosaic ({tiles.shape[1]} x {tiles.shape[0]})")
    if patch is not None:
        if patch < 1 or tiles.shape[0] % patch or tiles.shape[1] % patch:
            raise ValueError(f"mosaic of {tiles.shape[1]} x {tiles.shape[0]} px is not made of {patch} px tiles")
        for edge in np.arange(patch, tiles.shape[0], patch) - 0.5:
            right.axhline(edge, color="white", linewidth=0.4)
        for edge in np.arange(patch, tiles.shape[1], patch) - 0.5:
            right.axvline(edge, color="white", linewidth=0.4)
    for ax in (left, right):
        ax.set_axis_off()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    logger.info("wrote %s", out_png)
    return out_png
