"""One interface over the face detectors: photos in, faces (box, score, five ArcFace landmarks) out, in each photo's
own pixel coordinates, with the user's choices (largest face or all, a minimum size, a score threshold) applied.

Backends: ``mtcnn`` (default; ``photos.mtcnn``, weights from the facenet-pytorch package) and ``retinaface``
(insightface's ``det_10g.onnx`` given with ``--detector-weights``, run with onnxruntime; ``photos.retinaface``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from utils.images import DECODE_ERRORS

DETECTORS = ("mtcnn", "retinaface")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# A detector backend: (H, W, 3) uint8 RGB arrays -> per image ``boxes`` (F, 4), ``scores`` (F,), ``landmarks`` (F, 5, 2)
Backend = Callable[[list[np.ndarray]], list[dict[str, torch.Tensor]]]


@dataclass
class Face:
    """One detected face.

    Attributes:
        box: x1, y1, x2, y2 in the photo's pixels.
        score: the detector's confidence.
        landmarks: (5, 2) left eye, right eye, nose tip, left and right mouth corner (as seen), pixel centres at
            integers.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def side(self) -> float:
        """The box's shorter side in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


@dataclass
class PhotoFaces:
    """The faces kept in one photo, or why none was: ``problem`` names it (not an image, no face, too small)."""

    path: Path
    faces: list[Face] = field(default_factory=list)
    problem: str | None = None
    image: Image.Image | None = None


def read_photo(path: str | Path) -> Image.Image:
    """The photo as an RGB image, turned upright by its EXIF orientation.

    Raises:
        ValueError: the file is not a readable image.
    """
    try:
        return open_photo(path)
    except DECODE_ERRORS as err:
        raise ValueError(f"{path} is not a readable image ({err})") from err


def open_photo(path: str | Path) -> Image.Image:
    """Decode a photo (raises PIL's decode errors, ``utils.images.DECODE_ERRORS``)."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def unreadable(err: Exception) -> str:
    """The problem line of a photo that does not decode."""
    return f"not a readable image ({err})"


class FaceDetector:
    """A detector backend with the selection rules applied.

    Args:
        backend: the detector (``Backend``).
        min_face: smallest face kept (the box's shorter side, pixels).
        score_threshold: smallest detector score kept.
        largest_only: keep only the largest face of each photo.
    """

    def __init__(self, backend: Backend, *, min_face: float, score_threshold: float, largest_only: bool) -> None:
        self.backend, self.min_face = backend, min_face
        self.score_threshold, self.largest_only = score_threshold, largest_only

    def select(self, found: dict[str, torch.Tensor]) -> tuple[list[Face], str | None]:
        """The faces kept from one image's detections and, when none is, the reason."""
        faces = [
            Face(b.numpy().astype(np.float64), float(s), p.numpy().astype(np.float64))
            for b, s, p in zip(found["boxes"], found["scores"], found["landmarks"])
            if s >= self.score_threshold
        ]
        if not faces:
            return [], "no face found"
        large = [f for f in faces if f.side >= self.min_face]
        if not large:
            biggest = max(f.side for f in faces)
            return [], f"no face of at least --min-face {self.min_face:g} px (largest {biggest:.0f} px)"
        if self.largest_only:
            large = [max(large, key=lambda f: f.area)]
        return large, None

    def detect(self, images: Sequence[Image.Image]) -> list[tuple[list[Face], str | None]]:
        """Faces of each image (one batch through the backend)."""
        found = self.backend([np.array(img) for img in images])
        return [self.select(f) for f in found]

    def detect_files(self, paths: Sequence[Path], batch_size: int, progress: bool = True) -> Iterator[PhotoFaces]:
        """Read and detect the photos in batches; unreadable files and photos without a kept face come back with
        their ``problem`` and the others are still processed."""
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="detect faces", unit="photo", disable=not progress)
        for start in range(0, len(paths), batch_size):
            readable, results = [], []
            for path in paths[start : start + batch_size]:
                try:
                    results.append(PhotoFaces(path, image=open_photo(path)))
                    readable.append(results[-1])
                except DECODE_ERRORS as err:
                    results.append(PhotoFaces(path, problem=unreadable(err)))
            if readable:
                for photo, (faces, problem) in zip(readable, self.detect([p.image for p in readable])):
                    photo.faces, photo.problem = faces, problem
            bar.update(len(results))
            yield from results
        bar.close()


def add_detector_args(parser: argparse.ArgumentParser, *, largest_default: bool) -> None:
    """The detection flags (one argument group)."""
    group = parser.add_argument_group("Face detection")
    group.add_argument("--detector", choices=DETECTORS, default="mtcnn", help="face detector (default: %(default)s)")
    group.add_argument(
        "--detector-weights",
        default=None,
        help="the detector's weights: insightface's det_10g.onnx for --detector retinaface (default: mtcnn's "
        "weights from the facenet-pytorch package)",
    )
    group.add_argument(
        "--min-face",
        type=float,
        default=20.0,
        help="smallest face kept, its box's shorter side in pixels " "(default: %(default)s)",
    )
    group.add_argument(
        "--score-threshold", type=float, default=0.9, help="smallest detector score kept (default: %(default)s)"
    )
    faces = group.add_mutually_exclusive_group()
    faces.add_argument(
        "--largest-face",
        dest="largest_face",
        action="store_true",
        default=largest_default,
        help="keep only the largest face of each photo" + (" (default)" if largest_default else ""),
    )
    faces.add_argument(
        "--all-faces",
        dest="largest_face",
        action="store_false",
        help="keep every face of each photo" + ("" if largest_default else " (default)"),
    )
    group.add_argument(
        "--detect-batch-size", type=int, default=8, help="photos per detector batch (default: %(default)s)"
    )


def detector_from_args(args: argparse.Namespace, device: torch.device, *, keep_all: bool = False) -> FaceDetector:
    """The detector the flags describe, on ``device``; ``keep_all`` keeps every face whatever ``--largest-face`` says
    (for callers that choose later).

    Raises:
        ValueError: a bad value, a missing weight file or a missing optional dependency.
    """
    if args.min_face <= 0:
        raise ValueError(f"--min-face must be > 0, got {args.min_face}")
    if not 0 <= args.score_threshold <= 1:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.detect_batch_size < 1:
        raise ValueError(f"--detect-batch-size must be >= 1, got {args.detect_batch_size}")
    if args.detector == "retinaface":
        from photos.retinaface import RetinaFaceONNX

        if not args.detector_weights:
            raise ValueError("--detector retinaface needs --detector-weights det_10g.onnx (insightface's buffalo_l)")
        backend = RetinaFaceONNX(args.detector_weights, device)
    else:
        from photos.mtcnn import PNET_CELL, MTCNN

        if args.detector_weights and not Path(args.detector_weights).is_dir():
            raise ValueError(f"--detector-weights {args.detector_weights}: mtcnn expects a folder of pnet/rnet/onet.pt")
        weights = Path(args.detector_weights) if args.detector_weights else None
        backend = MTCNN(min_face=max(float(PNET_CELL), args.min_face), weights=weights).to(device)
        backend = array_backend(backend)
    return FaceDetector(
        backend,
        min_face=args.min_face,
        score_threshold=args.score_threshold,
        largest_only=args.largest_face and not keep_all,
    )


def array_backend(net: torch.nn.Module) -> Backend:
    """Feed (H, W, 3) uint8 arrays to a network that takes (3, H, W) uint8 tensors."""

    def run(images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        return net([torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) for img in images])

    return run
