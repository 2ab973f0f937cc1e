"""GCD datasets for every registered benchmark: one implementation driven by :mod:`data_loader.registry`.

``build_gcd_datasets`` lists the benchmark root (image folders, or CASIA's RecordIO pair), checks it before any
training starts (image verification is done once per tree and recorded, :mod:`data_loader.verification`), applies
the class split and draws the labelled subset (docs/method.md, section 2.6), and returns the training set D_L ++ D_U
plus the evaluation views. Every item carries its ``uq_idx`` (position in its split's listing: sorted classes, then
sorted file names), so results gathered from several ranks can be put back in order.

References: GCD (Vaze et al.) ``data/get_datasets.py`` and ``data/data_utils.py`` (MergedDataset, labelled draw);
DINOv2 ``dinov2/data/adapters.py`` (samples carry their index).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_loader.recordio import RecordIOReader
from data_loader.registry import BenchmarkSpec, DatasetError, KnownRule, Layout, get_spec
from data_loader.transforms import EvalTransform, TrainTransform, TwoViewTransform
from data_loader.verification import VerifyGroup, find_corrupt, folder_group, recordio_group
from utils.distributed import is_primary
from utils.images import DECODE_ERRORS
from utils.presets import GCD_PRESET

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_MAX_NAMED = 5


class Split(str, Enum):
    """Split of a benchmark's listing."""

    TRAIN = "train"
    TEST = "test"


def _few(items: Sequence, limit: int = _MAX_NAMED) -> str:
    shown = ", ".join(str(x) for x in list(items)[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Listing and the benchmark construction rules shared with the builder
# ----------------------------------------------------------------------------------------------------------------


def list_class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``split_dir`` (one per class)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_image_files(class_dir: Path) -> list[str]:
    """Sorted names of the image files (by extension, non-hidden) directly inside ``class_dir``."""
    with os.scandir(class_dir) as it:
        return sorted(
            e.name for e in it if not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file()
        )


def casia_class_name(index: int, identity: Hashable) -> str:
    """Folder name of CASIA class ``index`` (draw order) drawn from source ``identity``; sorts in draw order."""
    return f"{index:05d}_{identity}"


def casia_split(
    groups: Mapping[Hashable, Sequence],
    num_ids: int,
    *,
    seed: int = 42,
    min_images: int = 50,
    train_fraction: float = 0.8,
    source: str = "source",
) -> list[tuple[Hashable, list, list]]:
    """CASIA benchmark selection (docs/method.md, section 2.3), identical on every rank.

    One ``random.Random(seed)`` stream: ``sample`` ``num_ids`` of the identities with >= ``min_images`` images (in
    ascending order), then per drawn identity shuffle its items (ascending) and put the first
    int(train_fraction * n) in train, the rest in test.

    Args:
        groups: identity -> its items (RecordIO keys or file names).
        num_ids: N, identities to draw.
        seed: selection seed.
        min_images: minimum items per eligible identity.
        train_fraction: fraction of each identity's items that go to train.
        source: description of the source for error messages.

    Returns:
        ``[(identity, train items sorted, test items sorted)]`` in draw order (= new class index).

    Raises:
        DatasetError: fewer than ``num_ids`` eligible identities.
    """
    eligible = sorted(k for k, items in groups.items() if len(items) >= min_images)
    if len(eligible) < num_ids:
        raise DatasetError(
            f"{source}: only {len(eligible)} of {len(groups)} identities have >= {min_images} images, "
            f"but {num_ids} are needed"
        )
    rng = random.Random(seed)
    selection = []
    for identity in rng.sample(eligible, num_ids):
        items = sorted(groups[identity])
        rng.shuffle(items)
        n_train = int(train_fraction * len(items))
        selection.append((identity, sorted(items[:n_train]), sorted(items[n_train:])))
    return selection


# ----------------------------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------------------------


class FileImageSource:
    """Images stored as files, addressed by listing position.

    Args:
        paths: image paths in listing order.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from (for messages)."""
        return self.paths[i]

    def verify(self, i: int) -> tuple[int, int]:
        """Parse image ``i``'s header with PIL ``verify`` and return its (width, height) (raises PIL's error when it
        is not an image)."""
        with Image.open(self.paths[i]) as img:
            img.verify()
            return img.size

    def load(self, i: int) -> Image.Image:
        """Decode image ``i`` to RGB.

        Raises:
            DatasetError: the file cannot be read or decoded (names the file).
        """
        try:
            with Image.open(self.paths[i]) as img:
                return img.convert("RGB")
        except DECODE_ERRORS as err:
            raise DatasetError(f"cannot read image {self.paths[i]}: {err}") from err

    def verify_groups(self, root: Path) -> list[VerifyGroup]:
        """The images grouped by folder, as the verification record stores them (one ``stat`` per file)."""
        by_folder: dict[str, list[int]] = {}
        for i, path in enumerate(self.paths):
            by_folder.setdefault(os.path.dirname(path), []).append(i)
        return [
            folder_group(root, folder, [os.path.basename(self.paths[i]) for i in positions], positions)
            for folder, positions in by_folder.items()
        ]

    def subset(self, keep: np.ndarray) -> FileImageSource:
        """The source restricted to listing positions ``keep`` (in that order)."""
        return FileImageSource([self.paths[i] for i in keep])


class RecordImageSource:
    """Images stored in a RecordIO file, addressed by listing position.

    Args:
        reader: the RecordIO reader.
        keys: record keys in listing order.
    """

    def __init__(self, reader: RecordIOReader, keys: Sequence[int]) -> None:
        self.reader = reader
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from (for messages)."""
        return f"{self.reader.rec_path} key {self.keys[i]}"

    def verify(self, i: int) -> tuple[int, int]:
        """Parse image ``i``'s header with PIL ``verify`` and return its (width, height) (raises when the record is
        truncated or not an image)."""
        with Image.open(io.BytesIO(self.reader.read(self.keys[i])[1])) as img:
            img.verify()
            return img.size

    def load(self, i: int) -> Image.Image:
        """Decode image ``i`` to RGB (errors name the file and key)."""
        return self.reader.read_image(self.keys[i])

    def verify_groups(self, root: Path) -> list[VerifyGroup]:
        """One group, the RecordIO pair, as the verification record stores it."""
        return [recordio_group(root, self.reader.rec_path, self.reader.idx_path, self.keys)]

    def subset(self, keep: np.ndarray) -> RecordImageSource:
        """The source restricted to listing positions ``keep`` (in that order)."""
        return RecordImageSource(self.reader, [self.keys[i] for i in keep])


ImageSource = FileImageSource | RecordImageSource


@dataclass
class _Listing:
    """One split: its images in listing order and their (original) class indices."""

    source: ImageSource
    labels: np.ndarray

    def subset(self, keep: np.ndarray) -> _Listing:
        return _Listing(self.source.subset(keep), self.labels[keep])


# ----------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------


class GCDDataset(Dataset):
    """Images of one split, each returned with its label and ``uq_idx``.

    Items are ``(image, label, uq_idx)``, or ``(image, label, uq_idx, is_labelled)`` when ``is_labelled`` is given
    (the merged training set). ``image`` is whatever ``transform`` returns (a list of views for
    :class:`TwoViewTransform`).

    Args:
        source: the split's images, indexed by ``uq_idx``.
        uq_idx: listing positions of this dataset's items, in item order.
        labels: label of each item (remapped: < num_known means known).
        transform: applied to the RGB PIL image.
        split: which split the items come from.
        is_labelled: per-item labelled flag, or None.
    """

    def __init__(
        self,
        source: ImageSource,
        uq_idx: np.ndarray,
        labels: np.ndarray,
        transform: Callable | None,
        split: Split,
        is_labelled: np.ndarray | None = None,
    ) -> None:
        if len(uq_idx) != len(labels) or (is_labelled is not None and len(is_labelled) != len(uq_idx)):
            raise ValueError("uq_idx, labels and is_labelled must have one entry per item")
        self.source = source
        self.uq_idx = np.asarray(uq_idx, dtype=np.int64)
        self.targets = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.split = split
        self.is_labelled = None if is_labelled is None else np.asarray(is_labelled, dtype=bool)

    def __len__(self) -> int:
        return len(self.uq_idx)

    def __getitem__(self, i: int) -> tuple:
        uq = int(self.uq_idx[i])
        img = self.source.load(uq)
        if self.transform is not None:
            img = self.transform(img)
        if self.is_labelled is None:
            return img, int(self.targets[i]), uq
        return img, int(self.targets[i]), uq, bool(self.is_labelled[i])

    def __repr__(self) -> str:
        extra = "" if self.is_labelled is None else f", labelled={int(self.is_labelled.sum())}"
        return f"{type(self).__name__}(split={self.split.value}, items={len(self)}{extra}, transform={self.transform})"


@dataclass
class GCDDatasets:
    """Everything a GCD run reads from one benchmark.

    Attributes:
        train: D_L ++ D_U with the two-view train transform; item ``(views, label, uq_idx, is_labelled)``.
        train_eval: every training image in ``uq_idx`` order with the test transform; item ``(img, label, uq_idx)``.
        unlabelled_eval: D_U with the test transform.
        test_eval: the test split with the test transform.
        labelled_mask: bool (len(train listing),), True = in D_L.
        train_labels: int64 labels over the train listing.
        test_labels: int64 labels over the test listing.
        num_classes: N.
        num_known: N_old; labels < num_known are known.
        class_names: folder (or identity) name of each label.
        spec: the benchmark spec.
        root: the benchmark root that was read.
    """

    train: GCDDataset
    train_eval: GCDDataset
    unlabelled_eval: GCDDataset
    test_eval: GCDDataset
    labelled_mask: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    num_known: int
    class_names: list[str]
    spec: BenchmarkSpec
    root: Path


# ----------------------------------------------------------------------------------------------------------------
# Reading a root
# ----------------------------------------------------------------------------------------------------------------


def _split_dirs(spec: BenchmarkSpec, root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DatasetError(f"data path {root} does not exist; {spec.name} expects {spec.expected_layout}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir} is missing; {spec.name} expects {spec.expected_layout}")
    for name in spec.test_dirs:
        if (root / name).is_dir():
            return train_dir, root / name
    raise DatasetError(
        f"{root} has no test split folder ({' or '.join(spec.test_dirs)}/); {spec.name} expects {spec.expected_layout}"
    )


def _list_folder_split(split_dir: Path, classes: list[str], class_ids: Sequence[int]) -> _Listing:
    paths: list[str] = []
    labels: list[int] = []
    for class_id in class_ids:
        class_dir = split_dir / classes[class_id]
        files = list_image_files(class_dir)
        if not files:
            raise DatasetError(
                f"class folder {class_dir} contains no images (expected files ending in {IMG_EXTENSIONS})"
            )
        prefix = str(class_dir) + os.sep
        paths.extend(prefix + name for name in files)
        labels.extend([class_id] * len(files))
    return _Listing(FileImageSource(paths), np.asarray(labels, dtype=np.int64))


def _check_same_classes(train_dir: Path, test_dir: Path, train_classes: list[str], test_classes: list[str]) -> None:
    if train_classes == test_classes:
        return
    only_train = sorted(set(train_classes) - set(test_classes))
    only_test = sorted(set(test_classes) - set(train_classes))
    parts = []
    if only_train:
        parts.append(f"only in {train_dir}: {_few(only_train)}")
    if only_test:
        parts.append(f"only in {test_dir}: {_few(only_test)}")
    raise DatasetError(f"train and test must hold the same class folders; {'; '.join(parts)}")


def _read_list_file(path: Path) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _choose_classes(spec: BenchmarkSpec, root: Path, train_dir: Path, classes: list[str]) -> list[int]:
    """Indices (into the sorted class folders) of the benchmark's classes, ascending."""
    n = spec.num_classes
    if n is None:
        return list(range(len(classes)))
    if spec.class_list_file is not None and (root / spec.class_list_file).is_file():
        wanted = _read_list_file(root / spec.class_list_file)
        missing = sorted(set(wanted) - set(classes))
        if len(wanted) != n or missing:
            raise DatasetError(
                f"{root / spec.class_list_file} must list {n} class folders of {train_dir}; it lists {len(wanted)}"
                + (f", missing: {_few(missing)}" if missing else "")
            )
        position = {name: i for i, name in enumerate(classes)}
        return sorted(position[name] for name in wanted)
    if spec.class_subset_seed is not None and len(classes) > n:
        drawn = np.random.RandomState(spec.class_subset_seed).choice(len(classes), n, replace=False)
        logger.info(
            "%s: drew %d of the %d classes in %s (seed %d)",
            spec.name,
            n,
            len(classes),
            train_dir,
            spec.class_subset_seed,
        )
        return sorted(int(i) for i in drawn)
    if len(classes) != n:
        hint = " (build the benchmark with python -m data_loader.build_gfd)" if spec.layout != Layout.GCD_FOLDER else ""
        raise DatasetError(f"{train_dir} has {len(classes)} class folders but {spec.name} needs exactly {n}{hint}")
    return list(range(n))


def _load_pickle_split(spec: BenchmarkSpec, file_name: str, split_dir: Path | None, root: Path) -> tuple[list, list]:
    base = split_dir if split_dir is not None else root
    path = base / file_name
    if not path.is_file():
        raise DatasetError(f"class-split file {path} does not exist; {spec.name} needs it (set osr_split_dir)")
    with open(path, "rb") as f:
        info = pickle.load(f)
    try:
        if spec.known_rule == KnownRule.PICKLE:
            return list(info["Old"]), list(info["New"])
        unknown = info["unknown_classes"]
        return list(info["known_classes"]), list(unknown["Hard"]) + list(unknown["Medium"]) + list(unknown["Easy"])
    except (KeyError, TypeError) as err:
        expected = "'Old' and 'New'" if spec.known_rule == KnownRule.PICKLE else "'known_classes' and 'unknown_classes'"
        raise DatasetError(f"class-split file {path} lacks {err}; expected a dict with keys {expected}") from err


def _resolve_num_known(spec: BenchmarkSpec, root: Path, num_classes: int, fixed: int, requested: int | None) -> int:
    """N_old: ``requested`` (default N // 2) where the caller chooses it, else the benchmark's ``fixed`` value.

    Raises:
        DatasetError: ``requested`` is out of 1..N-1, or differs from a fixed value (both named).
    """
    if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool)):
        raise DatasetError(f"--num-known must be an integer, got {requested!r}")
    if spec.num_known_from_caller:
        if requested is None:
            return num_classes // 2
        if not 1 <= requested < num_classes:
            raise DatasetError(
                f"--num-known {requested} is out of range for {spec.name} at {root}: it has {num_classes} identity "
                f"folders, so --num-known must be in 1..{num_classes - 1}"
            )
        return requested
    if requested is not None and requested != fixed:
        raise DatasetError(
            f"--num-known {requested} contradicts {spec.name}, whose number of known classes is fixed at {fixed}; "
            "drop --num-known, or read your own split with --dataset identity_folders"
        )
    return fixed


def _class_order(
    spec: BenchmarkSpec,
    root: Path,
    num_classes: int,
    osr_split_dir: Path | None,
    use_ssb_splits: bool,
    num_known: int | None,
) -> tuple[list[int], int]:
    """The benchmark's class indices ordered {known..., unknown...}, and the number of known ones."""
    if spec.known_rule == KnownRule.PICKLE or (use_ssb_splits and spec.ssb_split_file is not None):
        file_name = spec.split_file if spec.known_rule == KnownRule.PICKLE else spec.ssb_split_file
        known, unknown = _load_pickle_split(spec, file_name, osr_split_dir, root)
        order = [int(c) for c in known] + [int(c) for c in unknown]
        if sorted(order) != list(range(num_classes)):
            raise DatasetError(
                f"class-split file {file_name} must partition classes 0..{num_classes - 1}; it lists {len(order)}"
            )
        return order, _resolve_num_known(spec, root, num_classes, len(known), num_known)
    fixed = spec.num_known if spec.num_known is not None else num_classes // 2
    return list(range(num_classes)), _resolve_num_known(spec, root, num_classes, fixed, num_known)


def _list_recordio(spec: BenchmarkSpec, root: Path, progress: bool) -> tuple[_Listing, _Listing, list[str]]:
    reader = RecordIOReader(root / "train.rec", root / "train.idx")
    groups = reader.scan_identities(progress=progress)
    selection = casia_split(
        groups,
        spec.num_classes,
        seed=spec.selection_seed,
        min_images=spec.min_images,
        train_fraction=spec.train_fraction,
        source=str(reader.rec_path),
    )

    def listing(items_per_class: list[list[int]]) -> _Listing:
        keys = [key for items in items_per_class for key in items]
        labels = np.repeat(np.arange(len(items_per_class), dtype=np.int64), [len(items) for items in items_per_class])
        return _Listing(RecordImageSource(reader, keys), labels)

    train = listing([train_keys for _, train_keys, _ in selection])
    test = listing([test_keys for _, _, test_keys in selection])
    class_names = [casia_class_name(i, identity) for i, (identity, _, _) in enumerate(selection)]
    return train, test, class_names


def _drop_corrupt(listing: _Listing, bad: Mapping[int, str], skip_corrupt: bool, what: str) -> _Listing:
    """The listing without its unreadable images ``bad`` (position -> error); an error unless ``skip_corrupt``."""
    if not bad:
        return listing
    named = [f"{listing.source.describe(i)} ({err})" for i, err in bad.items()]
    if not skip_corrupt:
        raise DatasetError(
            f"{len(bad)} unreadable or corrupt image(s) in the {what} split: {_few(named, 3)}; "
            "fix or remove them, or pass skip_corrupt=True (--skip-corrupt) to leave them out"
        )
    logger.warning("skipping %d corrupt %s image(s):\n  %s", len(bad), what, "\n  ".join(named))
    keep = np.setdiff1d(np.arange(len(listing.source)), list(bad))
    return listing.subset(keep)


def _check_every_class_present(listing: _Listing, num_classes: int, class_names: list[str], what: str) -> None:
    counts = np.bincount(listing.labels, minlength=num_classes)
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(f"the {what} split has no (readable) image for class(es) {_few(empty)}")


def _read_benchmark(
    spec: BenchmarkSpec,
    root: Path,
    split_dir: Path | None,
    use_ssb_splits: bool,
    num_known: int | None,
    progress: bool,
) -> tuple[_Listing, _Listing, list[str], int]:
    """List both splits and apply the class split (``num_known``: the caller's N_old, None = the benchmark's).

    Returns:
        (train listing, test listing, class names, num_known); labels are remapped so that class c is
        ``class_names[c]`` and labels < num_known are the known classes.
    """
    if spec.layout == Layout.FACE_RECORDIO_OR_FOLDERS and (root / "train.rec").exists():
        known = _resolve_num_known(spec, root, spec.num_classes, spec.num_known, num_known)
        train, test, class_names = _list_recordio(spec, root, progress)
        return train, test, class_names, known

    train_dir, test_dir = _split_dirs(spec, root)
    all_classes = list_class_dirs(train_dir)
    _check_same_classes(train_dir, test_dir, all_classes, list_class_dirs(test_dir))
    if len(all_classes) < 2:
        raise DatasetError(f"{train_dir} has {len(all_classes)} class folder(s); a GCD benchmark needs at least 2")
    chosen = _choose_classes(spec, root, train_dir, all_classes)
    num_classes = len(chosen)
    order, num_known = _class_order(spec, root, num_classes, split_dir, use_ssb_splits, num_known)
    # folder index -> rank among the chosen folders -> position in {known..., unknown...}
    remap = np.full(len(all_classes), -1, dtype=np.int64)
    remap[[chosen[c] for c in order]] = np.arange(num_classes)
    train = _list_folder_split(train_dir, all_classes, chosen)
    test = _list_folder_split(test_dir, all_classes, chosen)
    train.labels, test.labels = remap[train.labels], remap[test.labels]
    return train, test, [all_classes[chosen[c]] for c in order], num_known


def labelled_subset(train_labels: np.ndarray, num_known: int, prop_train_labels: float, seed: int = 0) -> np.ndarray:
    """The labelled mask D_L over the train listing (docs/method.md, section 2.6), a function of the seed only.

    Over the known-class training images in listing order, ``RandomState(seed).choice(n_known,
    int(prop_train_labels * n_known), replace=False)`` picks the labelled ones.

    Args:
        train_labels: remapped labels of the train listing.
        num_known: N_old.
        prop_train_labels: fraction of known-class images that are labelled.
        seed: seed of the draw (0 reproduces the reference).

    Returns:
        Bool mask over the train listing.

    Raises:
        DatasetError: fewer images would be labelled than there are known classes (with none, the supervised
            terms never run and SSK is plain k-means).
    """
    known_positions = np.flatnonzero(np.asarray(train_labels) < num_known)
    n_known = len(known_positions)
    n_labelled = int(prop_train_labels * n_known)
    if n_labelled < num_known:
        raise DatasetError(
            f"--prop-train-labels {prop_train_labels} labels {n_labelled} of the {n_known} known-class training "
            f"images, fewer than one per known class ({num_known} classes); raise it"
        )
    chosen = np.random.RandomState(seed).choice(n_known, n_labelled, replace=False)
    mask = np.zeros(len(train_labels), dtype=bool)
    mask[known_positions[chosen]] = True
    return mask


def build_gcd_datasets(
    name: str,
    data_path: str | os.PathLike,
    *,
    image_size: int = 112,
    prop_train_labels: float = 0.5,
    seed: int = 0,
    num_known: int | None = None,
    skip_corrupt: bool = False,
    verify_images: bool = True,
    osr_split_dir: str | os.PathLike | None = None,
    use_ssb_splits: bool = False,
    input_preset: str = GCD_PRESET,
) -> GCDDatasets:
    """Read, check and split a benchmark (identical on every rank: it depends on seeds only).

    Under torch.distributed this is a collective (every rank calls it): the primary rank verifies the images, the
    others wait for its record of the verification (:mod:`data_loader.verification`).

    Args:
        name: registered dataset name (case-insensitive).
        data_path: the benchmark root.
        image_size: side S of the transformed images.
        prop_train_labels: fraction of the known-class training images in D_L.
        seed: seed of the labelled draw (``np.random.RandomState(seed)``).
        num_known: N_old, the known classes being the first ``num_known`` in sorted folder order. None = the
            benchmark's (N // 2 unless it fixes another value); only ``identity_folders`` accepts other values, in
            1..N-1.
        skip_corrupt: leave unreadable images out (logged) instead of raising; the record of the verification keeps
            which images were bad, so later runs skip the same ones.
        verify_images: check every image header (PIL ``verify``) up front, once per data tree: images recorded as
            verified with unchanged size and mtime are not opened again. Decoding errors during training always
            raise an error naming the file.
        osr_split_dir: folder of the class-split pickles (herbarium_19, ``use_ssb_splits``); default ``data_path``.
        use_ssb_splits: use the Semantic Shift Benchmark splits for cub, scars and aircraft.
        input_preset: the transforms' preset, ``gcd`` or ``face`` (``data_loader.transforms``).

    Returns:
        The :class:`GCDDatasets`.

    Raises:
        DatasetError: unknown name, missing or inconsistent folders, wrong class count, ``num_known`` out of range or
            contradicting the benchmark, empty class folder, corrupt image (unless ``skip_corrupt``), truncated
            RecordIO, missing class-split file, fewer labelled images than known classes.
    """
    spec = get_spec(name)
    if not 0.0 < prop_train_labels <= 1.0:
        raise DatasetError(f"prop_train_labels must be in (0, 1], got {prop_train_labels}")
    train_tf = TwoViewTransform(TrainTransform(image_size, input_preset))
    eval_tf = EvalTransform(image_size, input_preset)
    root = Path(data_path)
    progress = is_primary()
    split_dir = Path(osr_split_dir) if osr_split_dir is not None else None
    train, test, class_names, num_known = _read_benchmark(spec, root, split_dir, use_ssb_splits, num_known, progress)
    num_classes = len(class_names)

    if verify_images:
        bad_train, bad_test = find_corrupt(root, [train.source, test.source], progress=progress)
        train = _drop_corrupt(train, bad_train, skip_corrupt, "train")
        test = _drop_corrupt(test, bad_test, skip_corrupt, "test")
    _check_every_class_present(train, num_classes, class_names, "train")
    _check_every_class_present(test, num_classes, class_names, "test")

    mask = labelled_subset(train.labels, num_known, prop_train_labels, seed)
    labelled_idx, unlabelled_idx = np.flatnonzero(mask), np.flatnonzero(~mask)
    merged_idx = np.concatenate([labelled_idx, unlabelled_idx])
    all_idx = np.arange(len(train.labels))

    datasets = GCDDatasets(
        train=GCDDataset(
            train.source,
            merged_idx,
            train.labels[merged_idx],
            train_tf,
            Split.TRAIN,
            is_labelled=np.arange(len(merged_idx)) < len(labelled_idx),
        ),
        train_eval=GCDDataset(train.source, all_idx, train.labels, eval_tf, Split.TRAIN),
        unlabelled_eval=GCDDataset(train.source, unlabelled_idx, train.labels[unlabelled_idx], eval_tf, Split.TRAIN),
        test_eval=GCDDataset(test.source, np.arange(len(test.labels)), test.labels, eval_tf, Split.TEST),
        labelled_mask=torch.from_numpy(mask),
        train_labels=torch.from_numpy(train.labels.copy()),
        test_labels=torch.from_numpy(test.labels.copy()),
        num_classes=num_classes,
        num_known=num_known,
        class_names=class_names,
        spec=spec,
        root=root,
    )
    logger.info(
        "%s from %s: %d classes (%d known), train %d images (labelled %d, unlabelled %d), test %d images",
        spec.name,
        root,
        num_classes,
        num_known,
        len(all_idx),
        len(labelled_idx),
        len(unlabelled_idx),
        len(test.labels),
    )
    return datasets
