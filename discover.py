#!/usr/bin/env python3
"""Discover the people in a folder of raw photos with a trained checkpoint (docs/photos.md).

Every face is detected (MTCNN by default), aligned to the ArcFace template, embedded with the checkpoint (image +
flip), and clustered by semi-supervised k-means with the faces of an optional gallery of known people pinned to them;
K is given or estimated from the gallery (``--K auto``). The report folder gets:

- ``assignments.csv``: photo, face box, detector score, person (a gallery name or ``new_001``...), distance to the
  person's centre, low-confidence flag (gallery faces too, marked by their role);
- ``problems.csv``: files and gallery people that gave no usable face, with the reason;
- ``embeddings.pt``: the faces' embeddings and where they come from;
- ``report.html`` (self-contained, one row of thumbnails per person: known first, then new ones by size) and
  ``sheets/<person>.png`` contact sheets;
- ``settings.json`` last: the checkpoint, detector, clustering settings, K search and counts;
- ``cache/faces.pt``: detections and embeddings per file content, reused by reruns (new photos only are processed).

    python discover.py --checkpoint-weights output/train/arc/last.pth.tar --gallery known/ --photos raw/ \
        --out report/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from photos.assign import discover_people, parse_k
from photos.detection import add_detector_args, detector_from_args
from photos.discovery import GALLERY, Collected, FaceCache, collect_faces, list_inputs
from photos.embedding import load_embedder
from photos.files import atomic_write_bytes, save_image, write_csv
from photos.report import PersonRow, Thumb, contact_sheet, render_html
from utils.checkpoint import atomic_save, atomic_write_text
from utils.cli_errors import exit_code
from utils.config import hide_alias_spellings, parse_args_with_config
from utils.k_estimation import SEARCHES
from utils.logging import setup_logging
from utils.output_sets import OUTPUT_ID_KEY, new_output_id, refuse_complete_output, withdraw_manifest
from utils.run_lock import RunLock

logger = logging.getLogger("discover")

SETTINGS_FILE = "settings.json"
CACHE_FILE = Path("cache") / "faces.pt"
ASSIGNMENT_COLUMNS = (
    "photo", "role", "face", "x1", "y1", "x2", "y2", "score", "person", "distance", "low_confidence"
)  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    """The discovery parser."""
    parser = argparse.ArgumentParser(
        prog="discover.py",
        description="Detect, align and embed every face of a folder of photos, cluster them with a gallery of known "
        "people pinned, and write a CSV, the embeddings and a browsable report.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--checkpoint-weights",
        "--checkpoint_weights",
        dest="checkpoint_weights",
        required=True,
        help="trained checkpoint of a method that embeds images (recognition, FaceGCD)",
    )
    parser.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    parser.add_argument(
        "--gallery", default=None, help="folder of known people, one folder of photos each (default: none)"
    )
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument(
        "--aligned",
        action="store_true",
        help="the gallery and photos are aligned face crops (one face per file): no detection (default: off)",
    )
    parser.add_argument(
        "--K", "--k", dest="k", default="auto", help="number of people, or auto: estimated from the gallery "
        "(default: %(default)s)"
    )  # fmt: skip
    parser.add_argument("--max-k", type=int, default=None, help="largest K of --K auto (default: gallery people + "
                        "photo faces)")  # fmt: skip
    parser.add_argument("--k-search", choices=SEARCHES, default="brent", help="K search (default: %(default)s)")
    parser.add_argument("--n-init", type=int, default=10, help="k-means restarts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")
    parser.add_argument(
        "--low-confidence-ratio",
        type=float,
        default=0.9,
        help="flag a face whose distance to its centre is at least this times the distance to the next centre "
        "(default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="faces per embedding forward (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier report in --out (its cache is reused)"
    )
    parser.add_argument(
        "--unsafe-load", action="store_true", help="load the checkpoint with weights_only=False (default: off)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (default: bars on)")
    add_detector_args(parser, largest_default=False)
    return hide_alias_spellings(parser)


def _check_args(args: argparse.Namespace) -> int | None:
    """Value checks; the parsed --K."""
    k = parse_k(args.k)
    for flag, value, low in (("--n-init", args.n_init, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0 < args.low_confidence_ratio <= 1:
        raise ValueError(f"--low-confidence-ratio must be in (0, 1], got {args.low_confidence_ratio}")
    if args.max_k is not None and args.max_k < 1:
        raise ValueError(f"--max-k must be >= 1, got {args.max_k}")
    return k


def detector_key(args: argparse.Namespace) -> dict:
    """The settings that decide which faces a file gives (the cache's validity)."""
    if args.aligned:
        return {"aligned": True}
    weights = args.detector_weights
    return {
        "detector": args.detector,
        "weights": str(Path(weights).resolve()) if weights else None,
        "min_face": args.min_face,
        "score_threshold": args.score_threshold,
    }


def run(args: argparse.Namespace) -> int:
    """Discover, then write the report set (``settings.json`` last)."""
    k = _check_args(args)
    out = Path(args.out)
    files, people = list_inputs(Path(args.gallery) if args.gallery else None, Path(args.photos), out)
    refuse_complete_output(out / SETTINGS_FILE, args.overwrite, "a discovery report")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedder = load_embedder(args.checkpoint_weights, weights_only=not args.unsafe_load, device=device)
    detector = None if args.aligned else detector_from_args(args, device, keep_all=True)  # the cache keeps all
    with RunLock(out, "discovery report folder"):
        setup_logging(out)
        start = time.perf_counter()
        collected = collect_faces(
            files,
            detector,
            embedder,
            FaceCache(out / CACHE_FILE, detector_key(args)),
            largest_photo_face=args.largest_face,
            detect_batch_size=args.detect_batch_size,
            embed_batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        faces = collected.faces
        with_faces = {f.file.person for f in faces if f.file.role == GALLERY}
        for person in people:
            if person not in with_faces:
                collected.problems.append(
                    (f"{args.gallery}/{person}", "gallery person without a usable face: left out")
                )
        for source, problem in collected.problems:
            logger.warning("%s: %s", source, problem)
        if not any(f.file.role != GALLERY for f in faces):
            raise ValueError(f"--photos {args.photos}: no usable face in any photo (see the warnings above)")
        x = torch.stack([f.embedding for f in faces])
        gallery_person = [f.file.person if f.file.role == GALLERY else None for f in faces]
        assignment = discover_people(
            x,
            gallery_person,
            people,
            k,
            max_k=args.max_k,
            search=args.k_search,
            n_init=args.n_init,
            seed=args.seed,
            ratio=args.low_confidence_ratio,
            progress=not args.no_progress,
        )
        write_report(out, args, embedder, collected, assignment, x, time.perf_counter() - start)
    return 0


def write_report(out: Path, args, embedder, collected: Collected, assignment, x: torch.Tensor, seconds: float) -> None:
    """The report set; a complete earlier one is withdrawn first (``--overwrite``)."""
    manifest = out / SETTINGS_FILE
    stale = []
    if manifest.exists():
        stale = json.loads(manifest.read_text()).get("sheets", [])
        withdraw_manifest(manifest)
    output_id = new_output_id()
    faces = collected.faces
    rows = [
        [
            str(f.file.path), f.file.role, f.index, *(f"{v:.1f}" for v in f.box), f"{f.score:.4f}",
            person, f"{dist:.4f}", int(low),
        ]  # fmt: skip
        for f, person, dist, low in zip(faces, assignment.person, assignment.distance, assignment.low_confidence)
    ]
    write_csv(out / "assignments.csv", ASSIGNMENT_COLUMNS, rows)
    write_csv(out / "problems.csv", ["source", "problem"], collected.problems)
    atomic_save(
        {
            "embeddings": x,
            "photo": [str(f.file.path) for f in faces],
            "face": [f.index for f in faces],
            "role": [f.file.role for f in faces],
            "person": assignment.person,
            OUTPUT_ID_KEY: output_id,
        },
        out / "embeddings.pt",
    )
    people = {name: PersonRow(name, name in assignment.known) for name in assignment.people}
    for f, person, low in zip(faces, assignment.person, assignment.low_confidence):
        thumb = Image.fromarray(f.thumb.permute(1, 2, 0).numpy())
        people[person].faces.append(Thumb(thumb, f.file.path.name, f.file.role == GALLERY, bool(low)))
    for row in people.values():
        row.faces.sort(key=lambda t: not t.gallery)
    photo_faces = sum(f.file.role != GALLERY for f in faces)
    new = len(assignment.people) - len(assignment.known)
    summary = (
        f"{photo_faces} faces in the photos: {len(assignment.known)} known people, {new} new; K = {assignment.k}"
        f"{' (estimated)' if assignment.estimate else ''}; checkpoint {Path(embedder.checkpoint).name}"
    )
    atomic_write_bytes(out / "report.html", render_html(list(people.values()), "Discovered people", summary).encode())
    sheets = [f"sheets/{name}.png" for name in people]
    for name in stale:
        if name not in sheets:
            (out / name).unlink(missing_ok=True)
    for name, row in zip(sheets, people.values()):
        save_image(contact_sheet(row), out / name)
    settings = {
        "checkpoint": embedder.checkpoint,
        "checkpoint_sha256": embedder.digest,
        "input_preset": embedder.preset,
        "image_size": embedder.image_size,
        "detection": detector_key(args),
        "largest_face_of_photos": bool(args.largest_face),
        "gallery": args.gallery,
        "photos": args.photos,
        "K": assignment.k,
        "K_given": args.k,
        "K_estimate": assignment.estimate,
        "n_init": args.n_init,
        "seed": args.seed,
        "low_confidence_ratio": args.low_confidence_ratio,
        "known_people": assignment.known,
        "new_people": len(assignment.people) - len(assignment.known),
        "faces": len(faces),
        "photo_faces": photo_faces,
        "problems": len(collected.problems),
        "files_reused": collected.reused,
        "files_detected": collected.detected,
        "faces_embedded": collected.embedded,
        "seconds": seconds,
        "sheets": sheets,
        OUTPUT_ID_KEY: output_id,
    }
    atomic_write_text(manifest, json.dumps(settings, indent=2))
    logger.info("%s; report in %s", summary, out / "report.html")


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line (``-c/--config`` YAML defaults as in the other scripts): bad input ends with one error
    message and exit code 2."""
    setup_logging()
    try:
        args = parse_args_with_config(get_args_parser(), argv)
    except (ValueError, OSError) as err:  # an unreadable -c/--config file
        logger.error("%s", err)
        return 2
    return exit_code(lambda: run(args), logger)


if __name__ == "__main__":
    sys.exit(cli())
