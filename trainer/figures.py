"""End-of-run pictures of the landmark front end: ``landmarks.png`` and ``mosaic.png`` in the run folder.

A model has a landmark front end when one of its submodules is a :class:`model.landmark.LandmarkFrontEnd` (Part fViT
``FaceRecognizer.front_end``, FaceGCD ``--landmark-cnn``, LAFS ``DINOMethod.front_end.landmarks``); LAFS-style
regularisation copies (submodules named ``reference*``) are skipped. The pictures use up to 16 images spread evenly
over the first validation set (``test`` when there is one), or over the training set when the run has no validation,
always through the evaluation transform at the front end's input size. On a SynthFaces folder (``landmarks.csv``
beside ``train/`` and ``test/``) the generator's 5 ground-truth points are drawn too, mapped through that transform.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from data_loader.synthface import LANDMARK_COLUMNS, LANDMARK_NAMES
from data_loader.transforms import EvalTransform, resize_size
from model.landmark import LandmarkFrontEnd, landmark_mosaic
from utils.landmark_plots import plot_landmarks, plot_mosaic
from utils.presets import FACE_PRESET, GCD_PRESET, preset_normalisation

logger = logging.getLogger(__name__)

FIGURE_IMAGES = 16
LANDMARKS_PNG = "landmarks.png"
MOSAIC_PNG = "mosaic.png"
SYNTH_LANDMARKS_CSV = "landmarks.csv"
_PREFERRED_EVAL_SET = "test"
_REFERENCE_PREFIX = "reference"


def find_landmark_front_end(model: nn.Module) -> LandmarkFrontEnd | None:
    """The landmark front end among ``model``'s submodules (the model itself included), or None.

    Submodules whose name has a part starting with ``reference`` (the frozen copy LAFS fine-tuning regularises
    towards) are passed over while another one exists.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LandmarkFrontEnd)]
    own = [m for name, m in found if not any(part.startswith(_REFERENCE_PREFIX) for part in name.split("."))]
    if own:
        return own[0]
    return found[0][1] if found else None


def eval_transform_points(
    points: np.ndarray, width: int, height: int, image_size: int, preset: str = GCD_PRESET
) -> np.ndarray:
    """Map pixel coordinates of a ``width x height`` image to the output of ``EvalTransform(image_size, preset)``.

    Coordinates are (x, y) with pixel centres at integers (SynthFaces' ``landmarks.csv`` convention). The ``gcd``
    preset resizes the shorter side to ``int(S / 0.875)`` (the longer one to ``int(new_short * long / short)``, as
    torchvision does), which maps ``x -> (x + 0.5) * new_w / width - 0.5``, then centre-crops ``S x S`` from
    ``left = round((new_w - S) / 2)``, ``top = round((new_h - S) / 2)``. The ``face`` preset resizes the whole image
    to ``S x S``: ``x -> (x + 0.5) * S / width - 0.5``.

    Args:
        points: (..., 2) array of (x, y) pixel coordinates.
        width: source image width in pixels.
        height: source image height in pixels.
        image_size: S, the transform's output side.
        preset: the input preset (``gcd`` or ``face``).

    Returns:
        (..., 2) float64 coordinates in the S x S network input.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1] != 2:
        raise ValueError(f"points must be (..., 2) (x, y) pairs, got shape {points.shape}")
    if preset == FACE_PRESET:
        return (points + 0.5) * np.array([image_size / width, image_size / height]) - 0.5
    short = resize_size(image_size)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    scale = np.array([new_w / width, new_h / height])
    offset = np.array([round((new_w - image_size) / 2.0), round((new_h - image_size) / 2.0)])
    return (points + 0.5) * scale - 0.5 - offset


def _read_synth_landmarks(csv_path: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """``(split, identity, file) -> (5, 2)`` points of a SynthFaces ``landmarks.csv``."""
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("split", "identity", "file", *LANDMARK_COLUMNS) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path} lacks the column(s) {', '.join(missing)}; a SynthFaces landmarks.csv has "
                f"split,identity,file,{','.join(LANDMARK_COLUMNS)}"
            )
        return {
            (row["split"], row["identity"], row["file"]): np.array(
                [float(row[c]) for c in LANDMARK_COLUMNS], dtype=np.float64
            ).reshape(len(LANDMARK_NAMES), 2)
            for row in reader
        }


def synthface_points(paths: Sequence[str]) -> np.ndarray | None:
    """SynthFaces ground-truth points of image files laid out as ``ROOT/<split>/<identity>/<file>``.

    ``ROOT/landmarks.csv`` is looked up for every image; images without a row get NaN points.

    Args:
        paths: image file paths.

    Returns:
        (B, 5, 2) points (x, y) in the files' pixel coordinates, or None when no image has a row (not SynthFaces).
    """
    tables: dict[Path, dict[tuple[str, str, str], np.ndarray]] = {}
    points = np.full((len(paths), len(LANDMARK_NAMES), 2), np.nan)
    found = False
    for i, path in enumerate(paths):
        path = Path(path)
        if len(path.parts) < 4:
            continue
        csv_path = path.parents[2] / SYNTH_LANDMARKS_CSV
        if csv_path not in tables:
            tables[csv_path] = _read_synth_landmarks(csv_path) if csv_path.is_file() else {}
        row = tables[csv_path].get((path.parts[-3], path.parts[-2], path.parts[-1]))
        if row is not None:
            points[i] = row
            found = True
    return points if found else None


@dataclass
class FigureBatch:
    """The images the pictures show.

    Attributes:
        images: (B, 3, S, S) float32 network inputs (evaluation transform, normalised).
        display: (B, 3, S, S) the same images de-normalised to [0, 1].
        true_points: (B, 5, 2) SynthFaces ground truth in network-input pixels (NaN where unknown), or None.
        source: the dataset they come from, e.g. ``"test set"`` (for titles and logs).
    """

    images: torch.Tensor
    display: torch.Tensor
    true_points: torch.Tensor | None
    source: str


def _figure_dataset(setup: Any) -> tuple[Dataset, str]:
    """The preferred validation set of a ``MethodSetup``, else its training set; and a name for it."""
    eval_sets = dict(getattr(setup, "eval_sets", None) or {})
    if eval_sets:
        name = _PREFERRED_EVAL_SET if _PREFERRED_EVAL_SET in eval_sets else next(iter(eval_sets))
        return eval_sets[name], f"{name} set"
    return setup.train_set, "training set"


def figure_batch(setup: Any, image_size: int, num_images: int = FIGURE_IMAGES, preset: str = GCD_PRESET) -> FigureBatch:
    """Up to ``num_images`` images spread evenly over the figure dataset, through ``EvalTransform(image_size, preset)``.

    Args:
        setup: a ``trainer.methods.MethodSetup`` (``eval_sets``, ``train_set``); the datasets must expose their
            images as ``source`` (``load(i)`` -> PIL image) and item positions as ``uq_idx``, as
            ``data_loader.datasets.GCDDataset`` does.
        image_size: S, the landmark front end's input side.
        num_images: how many images (fewer when the dataset is smaller).
        preset: the run's input preset.

    Returns:
        The :class:`FigureBatch`.
    """
    dataset, name = _figure_dataset(setup)
    source, uq_idx = getattr(dataset, "source", None), getattr(dataset, "uq_idx", None)
    if source is None or uq_idx is None:
        raise TypeError(
            f"cannot take figure images from the {name} ({type(dataset).__name__}): expected a dataset with an image "
            f"'source' and 'uq_idx' positions, like data_loader.datasets.GCDDataset"
        )
    if len(uq_idx) == 0 or num_images < 1:
        raise ValueError(f"no figure image to draw: the {name} has {len(uq_idx)} images, {num_images} requested")
    picks = np.unique(np.linspace(0, len(uq_idx) - 1, min(num_images, len(uq_idx))).round().astype(np.int64))
    positions = [int(uq_idx[i]) for i in picks]
    transform = EvalTransform(image_size, preset)
    images, sizes = [], []
    for pos in positions:
        img = source.load(pos)
        sizes.append(img.size)
        images.append(transform(img))
    images = torch.stack(images)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in preset_normalisation(preset))
    display = (images * std + mean).clamp(0, 1)

    paths = getattr(source, "paths", None)
    raw = None if paths is None else synthface_points([paths[pos] for pos in positions])
    true_points = None
    if raw is not None:
        mapped = np.stack([eval_transform_points(p, w, h, image_size, preset) for p, (w, h) in zip(raw, sizes)])
        true_points = torch.from_numpy(mapped).float()
    return FigureBatch(images, display, true_points, name)


def write_run_figures(model: nn.Module, setup: Any, out_dir: str | Path, device: torch.device | str) -> list[Path]:
    """Write ``landmarks.png`` and ``mosaic.png`` into ``out_dir`` for a model with a landmark front end.

    One forward of the landmark CNN over 16 images, in eval mode under ``no_grad`` (the front end's train/eval mode
    is restored afterwards). Nothing is written for a model without a landmark front end.

    Args:
        model: the trained method, unwrapped (not the DDP wrapper).
        setup: its ``trainer.methods.MethodSetup`` (where the images come from).
        out_dir: the run folder.
        device: where the model lives.

    Returns:
        The written paths (empty without a landmark front end).
    """
    front_end = find_landmark_front_end(model)
    if front_end is None:
        logger.info("no landmark front end in %s: no landmark pictures", type(model).__name__)
        return []
    batch = figure_batch(setup, front_end.img_size, preset=setup.data_config.get("input_preset", GCD_PRESET))
    dtype = next(front_end.parameters()).dtype
    was_training = front_end.training
    front_end.eval()
    try:
        with torch.no_grad():
            coords = front_end.landmarks(batch.images.to(device=device, dtype=dtype)).float().cpu()
    finally:
        front_end.train(was_training)
    mosaic = landmark_mosaic(batch.display[:1], coords[:1], front_end.patch, front_end.orientation)
    out_dir = Path(out_dir)
    title = f"{type(model).__name__}: learned landmarks on the {batch.source}"
    written = [
        plot_landmarks(batch.display, coords, out_dir / LANDMARKS_PNG, batch.true_points, title=title),
        plot_mosaic(batch.display[0], mosaic[0], out_dir / MOSAIC_PNG, patch=front_end.patch, coords=coords[0]),
    ]
    logger.info("landmark pictures of the %s: %s", batch.source, ", ".join(str(p) for p in written))
    return written
