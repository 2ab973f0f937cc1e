"""Two photos in, one similarity out (``verify.py --photos a.jpg b.jpg``).

The largest face of each photo is detected, aligned to the ArcFace template and embedded with the checkpoint (image +
flip summed, L2-normalised, as the verification protocols embed); the cosine similarity of the two embeddings is
printed, with the decision at a threshold given as a cosine (``--threshold``) or read from a pair-set evaluation of
``verify.py`` (``--threshold-from results.json``). A pair set's threshold t is a squared distance between normalised
embeddings, so it is the cosine 1 - t / 2.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from photos.detection import add_detector_args, detector_from_args
from photos.embedding import load_embedder
from utils.face_align import align_face

logger = logging.getLogger("photos.compare")


def add_photo_args(parser: argparse.ArgumentParser) -> None:
    """``--photos A B`` with its threshold flags and the detection flags (largest face by default)."""
    group = parser.add_argument_group("Two photos")
    group.add_argument(
        "--photos",
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="compare the largest faces of two photos, instead of --targets (default: none)",
    )
    group.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="cosine similarity that counts as the same person (default: none, or --threshold-from)",
    )
    group.add_argument(
        "--threshold-from",
        default=None,
        help="verify.py results.json whose pair-set threshold decides (cosine 1 - t / 2) (default: none)",
    )
    group.add_argument(
        "--threshold-set", default=None, help="the pair set of --threshold-from (default: its only pair set)"
    )
    add_detector_args(parser, largest_default=True)


def threshold_from_results(path: str | Path, name: str | None) -> tuple[float, str]:
    """The cosine threshold of a pair set in a ``verify.py`` results file, and a description.

    Raises:
        ValueError: unreadable file, no pair set, or several without ``--threshold-set``.
    """
    try:
        results = json.loads(Path(path).read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--threshold-from {path}: not a verify.py results.json ({err})") from err
    pair_sets = {k: v for k, v in results.items() if isinstance(v, dict) and "threshold" in v}
    if name is None:
        if len(pair_sets) != 1:
            raise ValueError(
                f"--threshold-from {path} holds {len(pair_sets)} pair sets ({', '.join(pair_sets) or 'none'}); "
                "name one with --threshold-set"
            )
        name = next(iter(pair_sets))
    if name not in pair_sets:
        raise ValueError(f"--threshold-set {name}: not a pair set of {path} ({', '.join(pair_sets) or 'none'})")
    distance = float(pair_sets[name]["threshold"])
    return 1.0 - distance / 2.0, f"{name} of {path} (squared distance {distance:.4f})"


def compare_photos(args: argparse.Namespace) -> int:
    """Detect, align, embed and compare ``args.photos``; print the similarity and the decision."""
    if args.threshold is not None and args.threshold_from:
        raise ValueError("give --threshold or --threshold-from, not both")
    threshold, source = args.threshold, "--threshold"
    if args.threshold_from:
        threshold, source = threshold_from_results(args.threshold_from, args.threshold_set)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedder = load_embedder(args.checkpoint_weights, weights_only=not args.unsafe_load, device=device)
    detector = detector_from_args(args, device)
    crops = []
    for photo in detector.detect_files([Path(p) for p in args.photos], batch_size=2, progress=False):
        if photo.problem:
            raise ValueError(f"--photos {photo.path}: {photo.problem}")
        largest = max(photo.faces, key=lambda f: f.area)
        crops.append(align_face(photo.image, largest.landmarks))
    a, b = embedder.embed(crops, progress=False)
    similarity = float(a @ b)
    print(f"cosine similarity {similarity:.4f}")
    if threshold is not None:
        verdict = "same person" if similarity >= threshold else "different people"
        print(f"{verdict} at threshold {threshold:.4f} ({source})")
    return 0
