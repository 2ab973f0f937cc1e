"""IJB-B / IJB-C 1:1 template verification (docs/method.md, section 12), in insightface's file layout.

Layout of a benchmark folder ``ROOT`` (insightface ``recognition/_evaluation_/ijb``: ``IJBB/meta/...``,
``IJBB/loose_crop/...``; ``NAME`` is ``ijbb`` or ``ijbc``)::

    ROOT/meta/NAME_face_tid_mid.txt        image_name template_id media_id          (one line per face)
    ROOT/meta/NAME_template_pair_label.txt template_id_1 template_id_2 label  (1 = same subject)
    ROOT/meta/NAME_name_5pts_score.txt     image_name x1 y1 ... x5 y5 detector_score
    ROOT/loose_crop/<image_name>

Fields are separated by whitespace. The faces of the first file are joined to their landmarks by image name (not
by line order, which insightface assumes).

Pipeline: each face is aligned from its five points to the ArcFace 112 x 112 template and embedded together with
its horizontal flip. The image feature depends on three switches, named as in insightface's result tables:

- F1 (``flip``): image + flip embeddings summed; F0: the image embedding alone;
- N1 (``keep_norm``): the feature keeps its norm, a quality weight in the pooling; N0: L2-normalised first;
- D1 (``detector_score``): multiplied by the face's detector score; D0: not.

A template feature averages the image features of each (template, media) into a media feature, sums the media
features of the template and L2-normalises the sum. A pair's score is the cosine of its two template features,
computed in blocks of a template-by-template GEMM (``pair_scores``). TAR@FAR comes from ``utils.evaluation.roc``,
by default as insightface's ``eval_ijbc.py`` takes it (sklearn's ROC with ``drop_intermediate=True``, the TPR of
the point with the closest FPR); ``exact_roc=True`` keeps every ROC point. insightface's default mode is N1D1F1.

With a process group, the embedding is collective: rank r of W aligns and embeds faces r, r + W, ... with its own
loader workers and the rows are gathered back into face order (``utils.sharding``), so every rank holds what one
process would compute; every rank then scores the pairs, and only the primary rank writes files.

With a learned template aggregator (FaceCoresetNet, docs/coreset.md) two more poolings are scored in the same table,
both from the plain image embeddings only (no flip, no media ids, no detector scores, as the FaceCoresetNet release
evaluates): ``mean``, the mean of the L2-normalised image embeddings of the template; ``aggregator``, the aggregator's
output for all the template's images (unit embeddings and norms), batched by size (``aggregated_template_features``).
N1D0F0 is the insightface pooling of exactly the same image features.

The pooling (``image_features``, ``template_features``, ``mean_template_features``, ``aggregated_template_features``)
and scoring (``pair_scores``) are pure tensor functions, separate from the file reading (``load_ijb_meta``) and the
embedding (``embed_ijb_faces``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from utils.checkpoint import atomic_write_text
from utils.distributed import get_world_size, is_primary
from utils.evaluation.pair_sets import image_to_array, stack_images
from utils.evaluation.roc import DEFAULT_FARS, RocCurve, far_label, format_tar_table, plot_roc, roc_curve, tar_at_far
from utils.face_align import ALIGNED_SIZE, align_face
from utils.images import DECODE_ERRORS
from utils.sharding import gather_rows_by_index, strided_shard

logger = logging.getLogger(__name__)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
# A template aggregator: (unit embeddings (B, N, D), norms (B, N), mask (B, N) True = real image) -> (B, D) features.
AggregateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

IJB_NAMES = ("ijbb", "ijbc")
META_DIR = "meta"
CROP_DIR = "loose_crop"
DEFAULT_MODE = "N1D1F1"
# Poolings scored beside the N/D/F modes when an aggregator is given (``score_poolings``).
MEAN_POOLING = "mean"
AGGREGATOR_POOLING = "aggregator"
_MODE_PATTERN = re.compile(r"^N([01])D([01])F([01])$")
# The line under the TAR table naming the ROC rule, keyed by ``exact_roc``.
ROC_RULES = {
    False: "TAR of the ROC point with the closest FPR; ROC thinned as sklearn's default drop_intermediate=True "
    "(insightface eval_ijbc.py).",
    True: "TAR of the ROC point with the closest FPR; exact ROC, every distinct score a point (exact_roc=True).",
}
# Below this fraction of (rows x columns) of a GEMM block actually asked for, the block is scored pair by pair.
_MIN_GEMM_DENSITY = 1 / 64


class IJBDataError(ValueError):
    """An IJB meta file is missing or malformed; the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class IJBMode:
    """The three feature switches (see the module docstring); ``name`` spells them as insightface does."""

    flip: bool = True
    keep_norm: bool = True
    detector_score: bool = True

    @property
    def name(self) -> str:
        return f"N{int(self.keep_norm)}D{int(self.detector_score)}F{int(self.flip)}"

    @classmethod
    def parse(cls, text: str) -> IJBMode:
        """``"N1D1F1"`` -> IJBMode(flip=True, keep_norm=True, detector_score=True)."""
        match = _MODE_PATTERN.match(text.strip().upper())
        if not match:
            raise ValueError(f"IJB mode {text!r} is not of the form N<0|1>D<0|1>F<0|1>, e.g. {DEFAULT_MODE}")
        norm, detector, flip = (bool(int(v)) for v in match.groups())
        return cls(flip=flip, keep_norm=norm, detector_score=detector)


@dataclass(frozen=True)
class IJBMeta:
    """The meta data of one IJB benchmark, one entry per face (line of ``NAME_face_tid_mid.txt``) and per pair.

    ``landmarks`` are (n, 5, 2) float32 loose-crop pixels, ``pairs`` (P, 2) int64 template ids, ``labels`` (P,) bool.
    """

    root: Path
    name: str
    image_names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    detector_scores: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray

    @property
    def crop_dir(self) -> Path:
        return self.root / CROP_DIR


def meta_paths(root: str | os.PathLike, name: str) -> dict[str, Path]:
    """The three meta files of ``root`` for benchmark ``name`` (ijbb / ijbc), keyed faces / pairs / landmarks."""
    if name not in IJB_NAMES:
        raise ValueError(f"IJB benchmark name {name!r} is not one of {', '.join(IJB_NAMES)}")
    meta = Path(root) / META_DIR
    return {
        "faces": meta / f"{name}_face_tid_mid.txt",
        "pairs": meta / f"{name}_template_pair_label.txt",
        "landmarks": meta / f"{name}_name_5pts_score.txt",
    }


def ijb_name(root: str | os.PathLike) -> str:
    """Which benchmark (ijbb / ijbc) the folder ``root`` holds, from the name of its ``meta/*_face_tid_mid.txt``.

    Raises:
        IJBDataError: ``root`` is not a pair-set ``.bin`` nor a folder with exactly one benchmark's meta files.
    """
    found = [name for name in IJB_NAMES if meta_paths(root, name)["faces"].is_file()]
    if len(found) != 1:
        expected = " or ".join(str(meta_paths(root, name)["faces"]) for name in IJB_NAMES)
        raise IJBDataError(
            f"verification target {root}: expected an insightface .bin pair set or an IJB folder holding one of "
            f"{expected}; found {len(found)} benchmark(s)"
        )
    return found[0]


_EXPECTED = {
    "faces": "image_name template_id media_id (3 fields; integer ids)",
    "pairs": "template_id_1 template_id_2 label (3 integers; label 0 or 1)",
    "landmarks": "image_name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 detector_score (12 fields; numbers)",
}


def _data_lines(path: Path):
    """(line number, fields) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if fields:
                yield number, fields


def _malformed(path: Path, number: int, fields: list[str], kind: str) -> IJBDataError:
    return IJBDataError(f"{path}:{number}: expected '{_EXPECTED[kind]}', got {' '.join(fields)!r}")


def _read_faces(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, ids = [], []
    for number, fields in _data_lines(path):
        try:
            if len(fields) != 3:
                raise ValueError
            ids.append((int(fields[1]), int(fields[2])))
        except ValueError:
            raise _malformed(path, number, fields, "faces") from None
        names.append(fields[0])
    if not names:
        raise IJBDataError(f"{path}: no faces; expected lines '{_EXPECTED['faces']}'")
    table = np.asarray(ids, dtype=np.int64)
    return names, table[:, 0], table[:, 1]


def _read_landmarks(path: Path) -> dict[str, tuple[int, list[float]]]:
    rows: dict[str, tuple[int, list[float]]] = {}
    for number, fields in _data_lines(path):
        try:
            if len(fields) != 12:
                raise ValueError
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise _malformed(path, number, fields, "landmarks") from None
        if not all(map(math.isfinite, values)):
            raise _malformed(path, number, fields, "landmarks")
        if fields[0] in rows:
            raise IJBDataError(f"{path}:{number}: image {fields[0]} already listed on line {rows[fields[0]][0]}")
        rows[fields[0]] = (number, values)
    return rows


def _pair_line_number(path: Path, index: int) -> int:
    """Line number of the ``index``-th (0-based) data line of ``path``."""
    for position, (number, _) in enumerate(_data_lines(path)):
        if position == index:
            return number
    raise IndexError(index)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
        try:
            table = np.loadtxt(path, dtype=np.int64, ndmin=2)
        except ValueError:
            table = None
    if table is not None and table.size == 0:
        raise IJBDataError(f"{path}: no pairs; expected lines '{_EXPECTED['pairs']}'")
    if table is None or table.shape[1] != 3:
        # The fast reader does not say which line it stopped at; find the first bad one.
        for number, fields in _data_lines(path):
            if len(fields) != 3 or not all(_is_int(v) for v in fields):
                raise _malformed(path, number, fields, "pairs")
        raise IJBDataError(f"{path}: unreadable; expected lines '{_EXPECTED['pairs']}'")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        number = _pair_line_number(path, int(bad[0]))
        raise IJBDataError(f"{path}:{number}: label {table[bad[0], 2]} is not 0 or 1 ({bad.size} such lines)")
    return table[:, :2].copy(), table[:, 2].astype(bool)


def load_ijb_meta(root: str | os.PathLike, name: str) -> IJBMeta:
    """Read and check the meta files of an IJB benchmark folder.

    Args:
        root: the folder holding ``meta/`` and ``loose_crop/`` (insightface's ``IJBB`` or ``IJBC`` folder).
        name: ``ijbb`` or ``ijbc`` (the file-name prefix).

    Returns:
        The ``IJBMeta``.

    Raises:
        IJBDataError: a missing meta file or crop folder, a malformed line (file:line), a face without a landmarks
            line, or a pair naming a template that has no face.
    """
    root = Path(root)
    paths = meta_paths(root, name)
    for kind, path in paths.items():
        if not path.is_file():
            raise IJBDataError(f"missing IJB meta file {path}; expected lines '{_EXPECTED[kind]}'")
    if not (root / CROP_DIR).is_dir():
        raise IJBDataError(f"missing IJB image folder {root / CROP_DIR}; expected the loose face crops there")
    names, templates, medias = _read_faces(paths["faces"])
    marks = _read_landmarks(paths["landmarks"])
    missing = [n for n in names if n not in marks]
    if missing:
        raise IJBDataError(
            f"{paths['landmarks']}: no line for image {missing[0]} of {paths['faces']} ({len(missing)} faces lack "
            "one); expected a five-point line for every face"
        )
    unused = len(marks) - len(set(names))
    if unused:
        logger.info("%s: %d landmark lines name no face of %s; ignored", paths["landmarks"], unused, paths["faces"])
    values = np.asarray([marks[n][1] for n in names], dtype=np.float32)
    pairs, labels = _read_pairs(paths["pairs"])
    known = np.unique(templates)
    found = np.isin(pairs, known)
    if not found.all():
        index = int(np.flatnonzero(~found.all(1))[0])
        template = int(pairs[index][~found[index]][0])
        raise IJBDataError(
            f"{paths['pairs']}:{_pair_line_number(paths['pairs'], index)}: template {template} has no face in "
            f"{paths['faces']} ({int((~found).any(1).sum())} pairs name unknown templates)"
        )
    logger.info(
        "%s: %d faces, %d templates, %d pairs (%d genuine)", root, len(names), len(known), len(pairs), labels.sum()
    )
    return IJBMeta(
        root=root,
        name=name,
        image_names=names,
        templates=templates,
        medias=medias,
        landmarks=values[:, :10].reshape(-1, 5, 2),
        detector_scores=values[:, 10],
        pairs=pairs,
        labels=labels,
    )


# --------------------------------------------------------------------------------------------------------- embedding


class AlignedFaces(Dataset):
    """The faces of an ``IJBMeta`` as aligned (3, 112, 112) uint8 RGB arrays, in face order."""

    def __init__(self, meta: IJBMeta, size: int = ALIGNED_SIZE) -> None:
        self.meta = meta
        self.size = size

    def __len__(self) -> int:
        return len(self.meta.image_names)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.meta.crop_dir / self.meta.image_names[index]
        try:
            with Image.open(path) as img:
                aligned = align_face(img, self.meta.landmarks[index], self.size)
        except FileNotFoundError:
            raise FileNotFoundError(f"IJB face image {path} not found (listed in the meta files)") from None
        except DECODE_ERRORS as err:
            raise IJBDataError(f"{path}: does not decode as an image ({err})") from err
        return image_to_array(aligned)


@torch.no_grad()
def embed_ijb_faces(
    meta: IJBMeta, embed: EmbedFn, *, batch_size: int = 128, workers: int = 0, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align and embed every face and its horizontal flip, sharded over the ranks when a process group exists.

    Rank r of W embeds faces r, r + W, ... (all of them without a process group); the rows of every rank are
    gathered back into face order, so each rank returns what one process would. With a process group every rank
    must call it (the gather is a collective, run on the device of ``embed``'s output).

    Args:
        meta: the benchmark's meta data.
        embed: (B, 3, 112, 112) uint8 RGB -> (B, D) float embeddings (unnormalised).
        batch_size: faces per ``embed`` call.
        workers: DataLoader processes reading and aligning the crops, per rank.
        progress: show a tqdm bar (primary rank only).

    Returns:
        ((n, D) image embeddings, (n, D) flip embeddings), float32 on CPU, in face order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (DataLoader processes), got {workers}")
    faces = AlignedFaces(meta)
    if len(faces) < get_world_size():
        raise ValueError(f"{meta.root}: {len(faces)} faces cannot be shared by {get_world_size()} ranks")
    shard = strided_shard(len(faces))
    loader = DataLoader(
        Subset(faces, shard), batch_size=batch_size, num_workers=workers, shuffle=False, collate_fn=stack_images
    )
    plain, flipped = [], []
    device = torch.device("cpu")
    for batch in tqdm(loader, desc=f"{meta.name} faces", unit="batch", disable=not (progress and is_primary())):
        out, out_flip = embed(batch), embed(batch.flip(-1))
        if out.ndim != 2 or out.shape[0] != batch.shape[0] or out_flip.shape != out.shape:
            raise ValueError(
                f"embed must return (B, D) embeddings for a batch of {batch.shape[0]} faces, got {tuple(out.shape)}"
            )
        device = out.device
        plain.append(out.float().cpu())
        flipped.append(out_flip.float().cpu())
    _, (embeddings, flip_embeddings) = gather_rows_by_index(
        torch.tensor(shard, dtype=torch.int64), [torch.cat(plain), torch.cat(flipped)], device
    )
    return embeddings, flip_embeddings


# ------------------------------------------------------------------------------------------------- pooling, scoring


def image_features(
    embeddings: torch.Tensor,
    flip_embeddings: torch.Tensor | None,
    detector_scores: torch.Tensor | np.ndarray | None,
    mode: IJBMode = IJBMode(),
) -> torch.Tensor:
    """Per-image features under the F / N / D switches (module docstring), in float64.

    Args:
        embeddings: (n, D) image embeddings.
        flip_embeddings: (n, D) embeddings of the flipped images (required with ``mode.flip``).
        detector_scores: (n,) detector scores (required with ``mode.detector_score``).
        mode: the switches.

    Returns:
        (n, D) float64 image features.
    """
    feats = embeddings.double()
    if mode.flip:
        if flip_embeddings is None or flip_embeddings.shape != embeddings.shape:
            raise ValueError("mode F1 needs flip embeddings of the same shape as the image embeddings")
        feats = feats + flip_embeddings.to(feats)
    if not mode.keep_norm:
        feats = torch.nn.functional.normalize(feats, dim=1)
    if mode.detector_score:
        if detector_scores is None:
            raise ValueError("mode D1 needs the detector scores")
        scores = torch.as_tensor(detector_scores).to(feats)
        if scores.shape != (feats.shape[0],):
            raise ValueError(f"expected {feats.shape[0]} detector scores, got shape {tuple(scores.shape)}")
        feats = feats * scores[:, None]
    return feats


def template_features(
    image_feats: torch.Tensor, templates: torch.Tensor | np.ndarray, medias: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Template features: mean of each (template, media)'s image features, summed per template, L2-normalised.

    Args:
        image_feats: (n, D) image features.
        templates: (n,) template id of each image.
        medias: (n,) media id of each image (media ids are grouped within their template).

    Returns:
        (sorted unique template ids (T,) int64, (T, D) unit-norm template features, float32), on the features'
        device.
    """
    device = image_feats.device
    templates = torch.as_tensor(templates, dtype=torch.int64, device=device)
    medias = torch.as_tensor(medias, dtype=torch.int64, device=device)
    if image_feats.ndim != 2 or templates.shape != (image_feats.shape[0],) or medias.shape != templates.shape:
        raise ValueError(
            f"expected (n, D) features with n template and media ids, got {tuple(image_feats.shape)}, "
            f"{tuple(templates.shape)} and {tuple(medias.shape)}"
        )
    feats = image_feats.double()
    media_keys, media_of_image = torch.unique(torch.stack([templates, medias], 1), dim=0, return_inverse=True)
    media_sum = feats.new_zeros(len(media_keys), feats.shape[1]).index_add_(0, media_of_image, feats)
    media_count = torch.bincount(media_of_image, minlength=len(media_keys)).to(feats)
    template_ids, template_of_media = torch.unique(media_keys[:, 0], return_inverse=True)
    pooled = feats.new_zeros(len(template_ids), feats.shape[1])
    pooled.index_add_(0, template_of_media, media_sum / media_count[:, None])
    return template_ids, torch.nn.functional.normalize(pooled, dim=1).float()


def pad_templates(
    embeddings: torch.Tensor, template_of_row: torch.Tensor, num_templates: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the rows of each template into a padded batch (the input of a template aggregator).

    Args:
        embeddings: (M, D) unnormalised embeddings.
        template_of_row: (M,) int64 template index in [0, num_templates) of each row.
        num_templates: T.

    Returns:
        ((T, N_max, D) unit embeddings, (T, N_max) norms, (T, N_max) bool mask, True for real rows), each template's
        rows in their input order.

    Raises:
        ValueError: a template index without rows (an empty template).
    """
    counts = torch.bincount(template_of_row, minlength=num_templates)
    if bool((counts == 0).any()):
        raise ValueError(f"template {int(torch.nonzero(counts == 0)[0])} has no image (an empty template)")
    order = torch.argsort(template_of_row, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    owner = template_of_row[order]
    slot = torch.arange(len(order), device=embeddings.device) - starts[owner]
    norms_all = embeddings.norm(dim=-1)
    units = embeddings.new_zeros(num_templates, int(counts.max()), embeddings.shape[1])
    norms = embeddings.new_zeros(num_templates, int(counts.max()))
    mask = torch.zeros(num_templates, int(counts.max()), dtype=torch.bool, device=embeddings.device)
    units[owner, slot] = embeddings[order] / norms_all[order, None].clamp_min(1e-12)
    norms[owner, slot] = norms_all[order]
    mask[owner, slot] = True
    return units, norms, mask


def mean_template_features(
    embeddings: torch.Tensor, templates: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain mean pooling: the mean of the L2-normalised image embeddings of each template (media ids ignored),
    L2-normalised.

    Returns:
        (sorted unique template ids (T,) int64, (T, D) unit-norm features, float32).
    """
    units = torch.nn.functional.normalize(embeddings.double(), dim=1)
    media = torch.zeros(len(units), dtype=torch.int64, device=units.device)
    return template_features(units, templates, media)


def aggregated_template_features(
    embeddings: torch.Tensor,
    templates: torch.Tensor | np.ndarray,
    aggregate: AggregateFn,
    *,
    max_batch_rows: int = 1 << 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Template features from a learned aggregator, templates of similar size batched together.

    Templates are sorted by size and cut into batches whose padded size (templates x largest template) stays within
    ``max_batch_rows`` (a template larger than that forms a batch alone); each batch is padded (``pad_templates``) and
    pooled by one ``aggregate`` call, so padding never exceeds the size spread inside a batch.

    Args:
        embeddings: (n, D) unnormalised image embeddings (their norms are the aggregator's quality input).
        templates: (n,) template id of each image (media ids are not used).
        aggregate: (units (B, N, D), norms (B, N), mask (B, N)) -> (B, D) template features.
        max_batch_rows: padded rows per call.
        progress: show a tqdm bar over batches.

    Returns:
        (sorted unique template ids (T,) int64, (T, D) unit-norm features, float32), on the embeddings' device.
    """
    device = embeddings.device
    templates = torch.as_tensor(templates, dtype=torch.int64, device=device)
    if embeddings.ndim != 2 or templates.shape != (embeddings.shape[0],):
        raise ValueError(
            f"expected (n, D) embeddings and n template ids, got {tuple(embeddings.shape)} and {tuple(templates.shape)}"
        )
    template_ids, template_of_row = torch.unique(templates, return_inverse=True)
    counts = torch.bincount(template_of_row, minlength=len(template_ids))
    by_size = torch.argsort(counts, stable=True)
    rank = torch.empty_like(by_size)
    rank[by_size] = torch.arange(len(by_size), device=device)
    row_order = torch.argsort(rank[template_of_row], stable=True)
    row_bounds = torch.cumsum(counts[by_size], 0).tolist()
    sizes = counts[by_size].tolist()
    batches, start = [], 0
    while start < len(sizes):
        stop = start + 1
        while stop < len(sizes) and (stop + 1 - start) * sizes[stop] <= max_batch_rows:
            stop += 1
        batches.append((start, stop))
        start = stop
    feats = embeddings.new_zeros(len(template_ids), embeddings.shape[1], dtype=torch.float32)
    for lo, hi in tqdm(batches, desc="aggregating templates", unit="batch", disable=not progress):
        first_row = row_bounds[lo - 1] if lo else 0
        rows = row_order[first_row : row_bounds[hi - 1]]
        units, norms, mask = pad_templates(embeddings[rows].float(), rank[template_of_row[rows]] - lo, hi - lo)
        pooled = aggregate(units, norms, mask)
        feats[by_size[lo:hi]] = torch.nn.functional.normalize(pooled.float(), dim=1).to(device)
    return template_ids, feats


def template_rows(template_ids: torch.Tensor, pairs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Row of each pair's templates in ``template_ids`` (sorted unique ids), (P, 2) int64; unknown ids raise."""
    pairs = torch.as_tensor(pairs, dtype=torch.int64, device=template_ids.device)
    rows = torch.searchsorted(template_ids, pairs).clamp_(max=len(template_ids) - 1)
    unknown = template_ids[rows] != pairs
    if bool(unknown.any()):
        raise IJBDataError(f"pair template {int(pairs[unknown][0])} has no template feature")
    return rows


def pair_scores(
    feats: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    max_block_bytes: int = 256 << 20,
    progress: bool = False,
) -> torch.Tensor:
    """Dot products ``feats[first[k]] . feats[second[k]]`` of many pairs, as blocks of a template-by-template GEMM.

    The side with fewer distinct rows becomes the GEMM's rows, the other side's distinct rows its columns. Rows are
    cut into blocks whose score matrix (rows x columns, in ``feats``' dtype) fits ``max_block_bytes``; each block is
    one GEMM and the block's pairs are read out of it. A block whose pairs fill less than 1/64 of it is scored pair
    by pair (gathered rows, row-wise dot products) instead. Pair order is kept.

    Args:
        feats: (T, D) features (unit norm for cosines).
        first: (P,) row of each pair's first member.
        second: (P,) row of each pair's second member.
        max_block_bytes: memory cap of one block of scores (and of one gathered chunk).
        progress: show a tqdm bar over blocks.

    Returns:
        (P,) scores in ``feats``' dtype, on its device.
    """
    device = feats.device
    first = torch.as_tensor(first, dtype=torch.int64, device=device)
    second = torch.as_tensor(second, dtype=torch.int64, device=device)
    if feats.ndim != 2 or first.ndim != 1 or first.shape != second.shape:
        raise ValueError(
            f"expected (T, D) features and two (P,) index tensors, got {tuple(feats.shape)}, "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    num_rows = feats.shape[0]
    scores = feats.new_empty(first.shape[0])
    if first.numel() == 0:
        return scores
    lowest, highest = min(int(first.min()), int(second.min())), max(int(first.max()), int(second.max()))
    if lowest < 0 or highest >= num_rows:
        raise ValueError(f"pair indices must lie in [0, {num_rows}) (the rows of feats), got {lowest}..{highest}")
    used_first = torch.bincount(first, minlength=num_rows) > 0
    used_second = torch.bincount(second, minlength=num_rows) > 0
    if int(used_second.sum()) < int(used_first.sum()):
        first, second, used_first, used_second = second, first, used_second, used_first
    row_ids, col_ids = torch.nonzero(used_first).squeeze(1), torch.nonzero(used_second).squeeze(1)
    position = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    position[col_ids] = torch.arange(len(col_ids), device=device)
    pair_col = position[second]
    position[row_ids] = torch.arange(len(row_ids), device=device)
    pair_row = position[first]
    columns_t = feats[col_ids].t().contiguous()
    block = max(1, max_block_bytes // (feats.element_size() * len(col_ids)))
    num_blocks = (len(row_ids) + block - 1) // block
    if num_blocks == 1:
        order, bounds = None, [0, first.numel()]
    else:
        block_of_pair, order = torch.sort(pair_row // block)
        edges = torch.arange(num_blocks + 1, device=device)
        bounds = torch.searchsorted(block_of_pair, edges).tolist()
    chunk = max(1, max_block_bytes // (2 * feats.element_size() * feats.shape[1]))
    for b in tqdm(range(num_blocks), desc="pair scores", unit="block", disable=not progress):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        sel = slice(lo, hi) if order is None else order[lo:hi]
        rows = row_ids[b * block : (b + 1) * block]
        if (hi - lo) >= _MIN_GEMM_DENSITY * len(rows) * len(col_ids):
            block_scores = feats[rows] @ columns_t
            scores[sel] = block_scores[pair_row[sel] - b * block, pair_col[sel]]
            continue
        index = torch.arange(lo, hi, device=device) if order is None else order[lo:hi]
        for start in range(0, len(index), chunk):
            part = index[start : start + chunk]
            scores[part] = torch.linalg.vecdot(feats[first[part]], feats[second[part]])
    return scores


# ------------------------------------------------------------------------------------------------------- evaluation


@dataclass
class IJBResult:
    """Per-mode TAR@FAR and AUC of one IJB run, with its counts and timings (``to_dict`` is the JSON written).

    ``exact_roc`` records the ROC rule: False for insightface's (sklearn's ``drop_intermediate=True``), True for
    the exact ROC with every point.
    """

    name: str
    root: str
    num_faces: int
    num_templates: int
    num_pairs: int
    num_genuine: int
    exact_roc: bool
    tar_at_far: dict[str, dict[float, float]]
    auc: dict[str, float]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["tar_at_far"] = {
            mode: {far_label(far): tar for far, tar in row.items()} for mode, row in self.tar_at_far.items()
        }
        return out


def score_modes(
    meta: IJBMeta,
    embeddings: torch.Tensor,
    flip_embeddings: torch.Tensor | None,
    modes: Sequence[IJBMode],
    *,
    device: torch.device | None = None,
    max_block_bytes: int = 256 << 20,
) -> dict[str, torch.Tensor]:
    """Pair scores of every mode from one set of face embeddings.

    Args:
        meta: the benchmark's meta data.
        embeddings: (n, D) face embeddings in face order.
        flip_embeddings: (n, D) flip embeddings (needed by F1 modes).
        modes: the switch settings to score.
        device: where to pool and score (default: the embeddings' device).
        max_block_bytes: memory cap of one scoring block.

    Returns:
        {mode name: (P,) float32 scores on CPU, in pair-file order}.
    """
    device = device or embeddings.device
    out = {}
    for mode in modes:
        feats = image_features(
            embeddings.to(device),
            None if flip_embeddings is None else flip_embeddings.to(device),
            meta.detector_scores,
            mode,
        )
        template_ids, template_feats = template_features(feats, meta.templates, meta.medias)
        rows = template_rows(template_ids, meta.pairs)
        out[mode.name] = pair_scores(template_feats, rows[:, 0], rows[:, 1], max_block_bytes=max_block_bytes).cpu()
    return out


def score_poolings(
    meta: IJBMeta,
    embeddings: torch.Tensor,
    aggregate: AggregateFn,
    *,
    device: torch.device | None = None,
    max_block_bytes: int = 256 << 20,
) -> dict[str, torch.Tensor]:
    """Pair scores of plain mean pooling (``mean``) and of a learned aggregator (``aggregator``), both from the plain
    image embeddings alone: no flip, no media ids, no detector scores (the FaceCoresetNet release's protocol).

    Args:
        meta: the benchmark's meta data.
        embeddings: (n, D) unnormalised face embeddings in face order.
        aggregate: the template aggregator (``AggregateFn``).
        device: where to pool and score (default: the embeddings' device).
        max_block_bytes: memory cap of one scoring block.

    Returns:
        {``mean``, ``aggregator``: (P,) float32 scores on CPU, in pair-file order}.
    """
    embeddings = embeddings.to(device or embeddings.device)
    pooled = {
        MEAN_POOLING: mean_template_features(embeddings, meta.templates),
        AGGREGATOR_POOLING: aggregated_template_features(embeddings, meta.templates, aggregate),
    }
    out = {}
    for name, (template_ids, template_feats) in pooled.items():
        rows = template_rows(template_ids, meta.pairs)
        out[name] = pair_scores(template_feats, rows[:, 0], rows[:, 1], max_block_bytes=max_block_bytes).cpu()
    return out


def evaluate_ijb(
    root: str | os.PathLike,
    name: str,
    embed: EmbedFn,
    *,
    output_dir: str | os.PathLike | None = None,
    modes: Sequence[str | IJBMode] = (DEFAULT_MODE,),
    batch_size: int = 128,
    workers: int = 0,
    fars: Sequence[float] = DEFAULT_FARS,
    exact_roc: bool = False,
    device: torch.device | str | None = None,
    save_scores: bool = False,
    progress: bool = True,
    aggregate: AggregateFn | None = None,
) -> IJBResult:
    """IJB 1:1 verification of a model: embed the faces once, score each mode, write the results.

    With a process group every rank must call it: the faces are embedded sharded over the ranks (``embed_ijb_faces``),
    every rank scores all pairs and returns the same result, and the primary rank writes the files.

    Args:
        root: benchmark folder (``meta/``, ``loose_crop/``).
        name: ``ijbb`` or ``ijbc``.
        embed: (B, 3, 112, 112) uint8 RGB -> (B, D) float embeddings (unnormalised).
        output_dir: where to write ``NAME_results.json``, ``NAME_tar_at_far.md``, ``NAME_roc.png`` (and with
            ``save_scores`` ``NAME_<mode>_scores.npy``); None writes nothing.
        modes: switch settings, e.g. ``("N1D1F1", "N0D0F1")``.
        batch_size: faces per ``embed`` call.
        workers: DataLoader processes reading and aligning crops, per rank.
        fars: target FARs of the table.
        exact_roc: take TAR@FAR on the exact ROC (every distinct score a point) instead of insightface's
            (sklearn's default ``drop_intermediate=True``); recorded in the result and the written table.
        device: where to pool and score (default: CUDA when available).
        save_scores: also write the pair scores of each mode.
        progress: show tqdm bars (primary rank only).
        aggregate: a template aggregator; when given, ``mean`` and ``aggregator`` pooling (``score_poolings``) are
            scored beside the modes.

    Returns:
        The ``IJBResult``.
    """
    parsed = [m if isinstance(m, IJBMode) else IJBMode.parse(m) for m in modes]
    if not parsed:
        raise ValueError("evaluate_ijb: no modes given")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    meta = load_ijb_meta(root, name)
    seconds["meta"] = time.perf_counter() - start
    start = time.perf_counter()
    embeddings, flips = embed_ijb_faces(meta, embed, batch_size=batch_size, workers=workers, progress=progress)
    seconds["embed"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_modes(meta, embeddings, flips, parsed, device=device)
    if aggregate is not None:
        scores.update(score_poolings(meta, embeddings, aggregate, device=device))
    seconds["score"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = torch.from_numpy(meta.labels)
    curves: dict[str, RocCurve] = {}
    table: dict[str, dict[float, float]] = {}
    for mode_name, mode_scores in scores.items():
        curves[mode_name] = roc_curve(mode_scores.to(device), labels.to(device), drop_intermediate=not exact_roc)
        table[mode_name] = tar_at_far(curves[mode_name], fars=fars)
    seconds["roc"] = time.perf_counter() - start
    result = IJBResult(
        name=name,
        root=str(meta.root),
        num_faces=len(meta.image_names),
        num_templates=int(np.unique(meta.templates).size),
        num_pairs=len(meta.labels),
        num_genuine=int(meta.labels.sum()),
        exact_roc=exact_roc,
        tar_at_far=table,
        auc={mode_name: curve.auc() for mode_name, curve in curves.items()},
        seconds=seconds,
    )
    markdown = format_tar_table({f"{mode_name} ({name})": row for mode_name, row in table.items()})
    markdown += f"\n{ROC_RULES[exact_roc]}\n"
    logger.info("%s 1:1 verification, TAR (%%) at FAR:\n%s", name, markdown)
    if output_dir is not None and is_primary():
        out = Path(output_dir)
        atomic_write_text(out / f"{name}_results.json", json.dumps(result.to_dict(), indent=2) + "\n")
        atomic_write_text(out / f"{name}_tar_at_far.md", markdown)
        plot_roc(curves, out / f"{name}_roc.png", title=f"ROC on {name.upper()}", fars=fars)
        if save_scores:
            for mode_name, mode_scores in scores.items():
                np.save(out / f"{name}_{mode_name}_scores.npy", mode_scores.numpy())
        logger.info("wrote %s results to %s", name, out)
    return result
