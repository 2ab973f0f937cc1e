"""Training sets of the recognition method: a GFD benchmark's labelled subset D_L, or a whole identity-labelled set.

- A registered GFD benchmark (``--dataset youtubefaces_1000`` ...): the labelled known-identity images D_L, exactly the
  images FaceGCD reads labels of (same split, same ``--prop-train-labels`` draw), labelled 0..N_old-1. This is the
  ArcFace baseline of the FaceGCD paper; its checkpoints carry the benchmark's data settings, so extraction and SSK
  then run on D_U and the test split as for FaceGCD.
- ``recognition_folders``: ``<data-path>/<identity>/*.jpg``, every identity a class (sorted folder order).
- ``recognition_recordio``: insightface ``<data-path>/train.rec`` + ``train.idx`` (MS1MV2/3, Glint360K, WebFace), the
  labels read from the record headers and renumbered 0..C-1 in ascending label order.

Items are ``(image, label, index)``; the transform is the training preset of ``data_loader.transforms``, the one
FaceGCD's views use, so both methods see the same pixels.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from data_loader.datasets import (
    FileImageSource,
    GCDDataset,
    GCDDatasets,
    RecordImageSource,
    Split,
    list_class_dirs,
    list_image_files,
)
from data_loader.recordio import RecordIOReader
from data_loader.registry import DatasetError
from data_loader.transforms import TrainTransform
from utils.distributed import is_primary
from utils.presets import GCD_PRESET

logger = logging.getLogger(__name__)

RECOGNITION_SETS = ("recognition_folders", "recognition_recordio")


@dataclass
class RecognitionData:
    """What the recognition method trains on.

    Attributes:
        train: items ``(image, label, index)`` with the training transform.
        num_classes: identities of the classifier.
        gcd: the GFD benchmark's datasets when training on its D_L (clustering validation), else None.
        facts: counts identifying the set (stored in checkpoints with the data settings).
    """

    train: Dataset
    num_classes: int
    gcd: GCDDatasets | None
    facts: dict[str, Any]


def labelled_training_set(datasets: GCDDatasets, image_size: int, preset: str = GCD_PRESET) -> RecognitionData:
    """D_L of a GFD benchmark, labelled by known class (0..N_old-1), through the ``preset`` training transform."""
    labelled = np.flatnonzero(datasets.labelled_mask.numpy())
    labels = datasets.train_labels.numpy()[labelled]
    if len(labelled) == 0 or int(labels.max()) >= datasets.num_known:
        raise DatasetError(f"{datasets.spec.name}: the labelled subset must hold known-class images only")
    missing = sorted(set(range(datasets.num_known)) - set(labels.tolist()))
    if missing:
        logger.warning("%d known classes have no labelled image; their centres get no positive", len(missing))
    train = GCDDataset(datasets.train.source, labelled, labels, TrainTransform(image_size, preset), Split.TRAIN)
    facts = {"train_set": "labelled", "num_recognition_classes": int(datasets.num_known)}
    return RecognitionData(train, int(datasets.num_known), datasets, facts)


def _folder_set(root: Path, image_size: int, preset: str) -> tuple[Dataset, int, str]:
    if not root.is_dir():
        raise DatasetError(f"recognition_folders: {root} is not a folder (expected <data-path>/<identity>/*.jpg)")
    classes = list_class_dirs(root)
    if len(classes) < 2:
        raise DatasetError(f"recognition_folders: {root} has {len(classes)} identity folder(s); need at least 2")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_image_files(root / name)
        if not files:
            raise DatasetError(f"recognition_folders: identity folder {root / name} holds no images")
        paths += [str(root / name / f) for f in files]
        labels += [label] * len(files)
    source = FileImageSource(paths)
    return _plain(source, labels, image_size, preset), len(classes), str(root)


def _recordio_set(root: Path, image_size: int, preset: str) -> tuple[Dataset, int, str]:
    rec, idx = root / "train.rec", root / "train.idx"
    for path in (rec, idx):
        if not path.is_file():
            raise DatasetError(f"recognition_recordio: {path} does not exist (expected <data-path>/train.rec + .idx)")
    reader = RecordIOReader(rec, idx)
    groups = reader.scan_identities(progress=is_primary())
    if len(groups) < 2:
        raise DatasetError(f"recognition_recordio: {rec} holds {len(groups)} identity label(s); need at least 2")
    keys, labels = [], []
    for label, identity in enumerate(sorted(groups)):
        keys += groups[identity]
        labels += [label] * len(groups[identity])
    return _plain(RecordImageSource(reader, keys), labels, image_size, preset), len(groups), str(rec)


def _plain(source: Any, labels: list[int], image_size: int, preset: str) -> GCDDataset:
    n = len(labels)
    return GCDDataset(source, np.arange(n), np.asarray(labels), TrainTransform(image_size, preset), Split.TRAIN)


def identity_training_set(name: str, root: str | Path, image_size: int, preset: str = GCD_PRESET) -> RecognitionData:
    """A whole identity-labelled set (``recognition_folders`` or ``recognition_recordio``) through the ``preset``
    training transform."""
    if name not in RECOGNITION_SETS:
        raise DatasetError(f"unknown recognition set {name!r}; expected one of {', '.join(RECOGNITION_SETS)}")
    root = Path(root)
    build = _folder_set if name == "recognition_folders" else _recordio_set
    train, num_classes, where = build(root, image_size, preset)
    logger.info("%s from %s: %d identities, %d images", name, where, num_classes, len(train))
    facts = {
        "dataset": name,
        "data_path": str(root.resolve()),
        "image_size": int(image_size),
        "input_preset": preset,
        "train_set": "all",
        "num_recognition_classes": int(num_classes),
        "num_train": len(train),
    }
    return RecognitionData(train, num_classes, None, facts)


def recognition_data_path(args: argparse.Namespace) -> Path:
    """``--data-path`` of a recognition set (required: these sets have no default location)."""
    if not args.data_path:
        raise DatasetError(f"--dataset {args.dataset} needs --data-path (the folder holding the identities)")
    return Path(args.data_path)
