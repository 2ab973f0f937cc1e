"""Open-world discovery over a folder of raw photos (``discover.py``; docs/photos.md).

Every face of the gallery (``GALLERY/<person>/<photo>``, the largest face of each photo) and of the photos (all faces,
or the largest with ``--largest-face``) is detected, aligned and embedded; GCD's semi-supervised k-means
(``utils.kmeans.semi_supervised_kmeans``) then clusters all faces with the gallery's pinned to their person, K given or
estimated from the gallery (``utils.k_estimation.estimate_k``). Clusters holding a gallery person take that name; the
others are new people, ``new_001``... from the largest.

Detections and embeddings are kept per file content (SHA-256) in ``<out>/cache/faces.pt``, so a rerun with more
photos only detects and embeds the new or changed files. Detections are reused while the detector settings stay the
same, embeddings while the checkpoint file is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from photos.detection import IMAGE_SUFFIXES, FaceDetector, open_photo, read_photo, unreadable
from photos.embedding import FaceEmbedder, file_digest
from utils.checkpoint import atomic_save
from utils.face_align import ALIGNED_SIZE, ARCFACE_TEMPLATE_112, align_face
from utils.images import DECODE_ERRORS

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
THUMB_SIDE = 80
CHUNK_FILES = 64
GALLERY, PHOTO = "gallery", "photo"


@dataclass
class InputFile:
    """A gallery photo (with its person) or a photo to discover in."""

    path: Path
    role: str
    person: str | None = None
    digest: str = ""


@dataclass
class FaceRecord:
    """One face that takes part in the clustering."""

    file: InputFile
    index: int
    box: np.ndarray
    score: float
    embedding: torch.Tensor
    thumb: torch.Tensor


@dataclass
class Collected:
    """The faces of all files, the files' problems and how many files were detected anew."""

    faces: list[FaceRecord] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    detected: int = 0
    embedded: int = 0
    reused: int = 0


def list_inputs(gallery: Path | None, photos: Path, out: Path) -> tuple[list[InputFile], list[str]]:
    """The gallery's photos (one folder per person) and the photos (searched recursively, leaving out the report
    folder ``out`` when it lies inside), and the gallery people.

    Raises:
        ValueError: a missing folder, a gallery without person folders, or no photos at all.
    """
    files, people = [], []
    if gallery is not None:
        if not gallery.is_dir():
            raise ValueError(f"--gallery {gallery}: not a folder (expected one folder of photos per person)")
        people = sorted(p.name for p in gallery.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not people:
            raise ValueError(f"--gallery {gallery}: no person folders (expected {gallery}/<person>/<photo>)")
        for person in people:
            files += [InputFile(p, GALLERY, person) for p in _images(gallery / person)]
    if not photos.is_dir():
        raise ValueError(f"--photos {photos}: not a folder of photos")
    report = out.resolve()
    found = [InputFile(p, PHOTO) for p in _images(photos) if report not in p.resolve().parents]
    if not found:
        raise ValueError(f"--photos {photos}: no photos ({', '.join(IMAGE_SUFFIXES)})")
    return files + found, people


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and "/." not in str(p)
    )


class FaceCache:
    """Detections, thumbnails and embeddings per file content, valid for one detector setting.

    Args:
        path: the cache file.
        detector_key: the detector settings the detections were made with.
    """

    def __init__(self, path: Path, detector_key: dict) -> None:
        self.path, self.detector_key = path, detector_key
        self.entries: dict[str, dict] = {}
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("version") == CACHE_VERSION and stored.get("detector") == detector_key:
                self.entries = stored["files"]
                logger.info("%s: %d files' detections to reuse", path, len(self.entries))
            else:
                logger.info("%s: made with other detector settings; detecting every file anew", path)

    def save(self) -> None:
        atomic_save({"version": CACHE_VERSION, "detector": self.detector_key, "files": self.entries}, self.path)


def _entry_from_faces(faces, image: Image.Image) -> tuple[dict, list[Image.Image]]:
    """A cache entry (faces as rows x1 y1 x2 y2 score + 10 landmark coordinates, thumbnails) and the aligned crops."""
    crops = [align_face(image, f.landmarks) for f in faces]
    rows = [np.concatenate([f.box, [f.score], f.landmarks.reshape(-1)]) for f in faces]
    entry = {
        "faces": torch.tensor(np.array(rows), dtype=torch.float64).reshape(-1, 15),
        "thumbs": _thumbs(crops),
        "problem": None,
    }
    return entry, crops


def _thumbs(crops: Sequence[Image.Image]) -> torch.Tensor:
    if not crops:
        return torch.zeros(0, 3, THUMB_SIDE, THUMB_SIDE, dtype=torch.uint8)
    small = [np.asarray(c.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR)) for c in crops]
    return torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).contiguous()


def _aligned_entry(path: Path) -> tuple[dict, list[Image.Image]]:
    """``--aligned``: the whole image is one aligned face (resized to 112 x 112 when it has another size)."""
    try:
        image = open_photo(path)
    except DECODE_ERRORS as err:
        return {"faces": torch.zeros(0, 15, dtype=torch.float64), "problem": unreadable(err)}, []
    crop = image if image.size == (ALIGNED_SIZE, ALIGNED_SIZE) else image.resize((ALIGNED_SIZE,) * 2, Image.BICUBIC)
    scale = np.array(image.size, dtype=np.float64) / ALIGNED_SIZE
    row = np.concatenate([[0, 0, *image.size, 1.0], (ARCFACE_TEMPLATE_112 * scale).reshape(-1)])
    return {"faces": torch.tensor(row[None]), "thumbs": _thumbs([crop]), "problem": None}, [crop]


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def collect_faces(
    files: Sequence[InputFile],
    detector: FaceDetector | None,
    embedder: FaceEmbedder,
    cache: FaceCache,
    *,
    largest_photo_face: bool,
    detect_batch_size: int,
    embed_batch_size: int,
    progress: bool = True,
) -> Collected:
    """Detect, align and embed the faces of every file, reusing the cache; ``detector`` None means ``--aligned``.

    Gallery photos give their largest face, photos all of theirs (the largest with ``largest_photo_face``).
    """
    for f in files:
        f.digest = file_digest(f.path)
    todo = [f for f in files if embedder.digest not in cache.entries.get(f.digest, {}).get("embedded_by", {})]
    todo = list({f.digest: f for f in todo}.values())  # identical files are processed once
    result = Collected(reused=len(files) - len(todo))
    det_bar = tqdm(total=len(todo), desc="detect faces", unit="photo", disable=not progress)
    emb_bar = tqdm(total=0, desc="embed faces", unit="face", disable=not progress)
    for chunk in _chunks(todo, CHUNK_FILES):
        crops: list[tuple[dict, list[Image.Image]]] = []
        fresh = [f for f in chunk if f.digest not in cache.entries]
        for f, (entry, faces) in zip(fresh, _detect(fresh, detector, detect_batch_size)):
            cache.entries[f.digest] = entry
            crops.append((entry, faces))
            det_bar.update(1)
        result.detected += len(fresh)
        fresh_digests = {f.digest for f in fresh}
        for f in chunk:
            if f.digest not in fresh_digests:
                entry = cache.entries[f.digest]
                crops.append((entry, _recrop(f.path, entry, aligned=detector is None)))
        flat = [c for _, faces in crops for c in faces]
        emb_bar.total += len(flat)
        embeddings = embedder.embed(flat, embed_batch_size, progress=False) if flat else torch.zeros(0, 0)
        emb_bar.update(len(flat))
        start = 0
        for entry, faces in crops:
            entry["embeddings"] = embeddings[start : start + len(faces)].clone()
            entry["embedded_by"] = {embedder.digest: True}
            start += len(faces)
        result.embedded += len(flat)
        cache.save()
    det_bar.close()
    emb_bar.close()
    for f in files:
        _add_faces(result, f, cache.entries[f.digest], largest_photo_face)
    return result


def _detect(files: Sequence[InputFile], detector: FaceDetector | None, batch_size: int):
    """Cache entries and aligned crops of files not seen before."""
    if detector is None:
        for f in files:
            yield _aligned_entry(f.path)
        return
    for photo in detector.detect_files([f.path for f in files], batch_size, progress=False):
        if photo.problem:
            yield {"faces": torch.zeros(0, 15, dtype=torch.float64), "problem": photo.problem}, []
        else:
            yield _entry_from_faces(photo.faces, photo.image)


def _recrop(path: Path, entry: dict, aligned: bool) -> list[Image.Image]:
    """Aligned crops of a file's cached faces (its embeddings were made by another checkpoint)."""
    if not len(entry["faces"]):
        return []
    if aligned:
        return _aligned_entry(path)[1]
    image = read_photo(path)
    return [align_face(image, row[5:].numpy().reshape(5, 2)) for row in entry["faces"]]


def _add_faces(result: Collected, f: InputFile, entry: dict, largest_photo_face: bool) -> None:
    """The file's faces that take part (or its problem)."""
    if entry.get("problem"):
        result.problems.append((str(f.path), entry["problem"]))
        return
    rows = entry["faces"].numpy()
    order = list(range(len(rows)))
    if f.role == GALLERY or largest_photo_face:
        areas = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
        order = [int(np.argmax(areas))]
    for i in order:
        result.faces.append(
            FaceRecord(f, i, rows[i, :4], float(rows[i, 4]), entry["embeddings"][i], entry["thumbs"][i])
        )
