"""``python -m photos align --src RAW --out ALIGNED``: raw photos to aligned 112 x 112 identity folders.

``RAW`` holds identity folders (``RAW/<person>/<photo>``) or photos directly (then all their faces go to one
identity folder named after ``RAW``). Every kept face is aligned to the ArcFace template
(``utils.face_align.align_face``, insightface's warp) and written as ``ALIGNED/<person>/<photo stem>_<k>.png``
(k = 0 for the highest-scoring face), a tree that ``train.py``, ``build_gfd`` and the image-folder datasets read.
``ALIGNED/faces.csv`` lists every face (source photo, box, score, landmarks, aligned file) and
``ALIGNED/no_faces.csv`` every photo without one, with the reason (not an image, no face found, faces too small).
``faces.csv`` is written last: a folder without it is an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from photos.detection import IMAGE_SUFFIXES, FaceDetector, PhotoFaces, add_detector_args, detector_from_args
from photos.files import save_image, write_csv
from utils.face_align import align_face
from utils.output_sets import move_aside

logger = logging.getLogger("photos.align")

FACES_CSV, NO_FACES_CSV = "faces.csv", "no_faces.csv"
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
FACE_COLUMNS = (
    ["source", "identity", "face", "x1", "y1", "x2", "y2", "score"]
    + [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
    + ["aligned"]
)


def collect_photos(src: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """The photos of ``src`` with their identity, and files set aside with the reason.

    Returns:
        ``[(photo, identity)]`` sorted, and ``[(file, problem)]`` for photos outside identity folders.
    """
    if not src.is_dir():
        raise ValueError(f"--src {src}: not a folder of photos")
    is_photo = [p for p in sorted(src.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    folders = [p for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        if not is_photo:
            raise ValueError(f"--src {src}: no photos ({', '.join(IMAGE_SUFFIXES)}) and no identity folders")
        return [(p, src.resolve().name) for p in is_photo], []
    photos = [
        (p, folder.name)
        for folder in folders
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not photos:
        raise ValueError(f"--src {src}: its identity folders hold no photos ({', '.join(IMAGE_SUFFIXES)})")
    return photos, [(p, "not in an identity folder (the others are): skipped") for p in is_photo]


def face_stem(photo: Path, stems_seen: dict[tuple[str, str], int], identity: str) -> str:
    """``photo``'s stem, or its name with the suffix kept when another photo of the identity has the same stem."""
    key = (identity, photo.stem)
    stems_seen[key] = stems_seen.get(key, 0) + 1
    return photo.stem if stems_seen[key] == 1 else photo.name.replace(".", "_")


def face_row(source: str, identity: str, index: int, face, aligned: str) -> list[object]:
    """One ``faces.csv`` row."""
    box = [f"{v:.2f}" for v in face.box]
    points = [f"{v:.2f}" for v in face.landmarks.reshape(-1)]
    return [source, identity, index, *box, f"{face.score:.4f}", *points, aligned]


def align_tree(
    detector: FaceDetector,
    photos: Sequence[tuple[Path, str]],
    out: Path,
    *,
    batch_size: int,
    progress: bool = True,
) -> tuple[list[list[object]], list[tuple[str, str]]]:
    """Detect, align and write every face of ``photos`` under ``out/<identity>/``.

    Returns:
        The ``faces.csv`` rows and the ``(photo, problem)`` pairs of photos without a kept face.
    """
    identity_of = dict(photos)
    rows, problems, stems = [], [], {}
    result: PhotoFaces
    for result in detector.detect_files([p for p, _ in photos], batch_size, progress):
        identity = identity_of[result.path]
        if result.problem:
            problems.append((str(result.path), result.problem))
            continue
        stem = face_stem(result.path, stems, identity)
        for k, face in enumerate(result.faces):
            target = out / identity / f"{stem}_{k}.png"
            save_image(align_face(result.image, face.landmarks), target)
            rows.append(face_row(str(result.path), identity, k, face, str(target.relative_to(out))))
    return rows, problems


def get_args_parser() -> argparse.ArgumentParser:
    """The ``align`` parser."""
    parser = argparse.ArgumentParser(
        prog="python -m photos align",
        description="Detect, align (ArcFace 112 x 112) and write the faces of a folder of raw photos as identity "
        "folders, with a CSV of every face and a list of photos without one.",
        allow_abbrev=False,
    )
    parser.add_argument("--src", required=True, help="folder of photos, or of identity folders of photos")
    parser.add_argument("--out", required=True, help="output folder of aligned identity folders")
    parser.add_argument("--overwrite", action="store_true", help="move an existing --out aside and write anew")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (default: bars on)")
    add_detector_args(parser, largest_default=True)
    return parser


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``--overwrite`` (then it is moved aside, nothing deleted)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a folder is expected")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty; pass --overwrite to move it aside, or choose another folder")
        move_aside(out, "replaced by a new alignment (--overwrite)")


def run(args: argparse.Namespace) -> int:
    """Align ``--src`` into ``--out``."""
    import torch

    src, out = Path(args.src), Path(args.out)
    photos, skipped = collect_photos(src)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    detector = detector_from_args(args, device)
    prepare_output(out, args.overwrite)
    rows, problems = align_tree(detector, photos, out, batch_size=args.detect_batch_size, progress=not args.no_progress)
    problems = [(str(p), why) for p, why in skipped] + problems
    for photo, why in problems:
        logger.warning("%s: %s", photo, why)
    write_csv(out / NO_FACES_CSV, ["source", "problem"], problems)
    write_csv(out / FACES_CSV, FACE_COLUMNS, rows)
    logger.info(
        "%d faces from %d photos in %s (%d photos without a face: %s)",
        len(rows),
        len(photos),
        out,
        len(problems),
        out / NO_FACES_CSV,
    )
    return 0
