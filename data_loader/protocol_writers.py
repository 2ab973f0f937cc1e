"""Verification protocols rendered offline from held-out SynthFaces identities: a ``.bin`` pair set and an IJB folder.

Both writers draw identities ``first_identity, first_identity + 1, ...`` of a SynthFaces seed. Training sets use
identities ``0 .. ids - 1`` of their seed, so with the default offset (1,000,000) and the training seed the
protocol faces come from the same population (the seed's prototypes) but are people never seen in training. Image
streams are seeded with their own domain tags, so no protocol image repeats a training image.

``write_synthface_pair_set`` renders ``images_per_identity`` faces per identity, aligns each to the ArcFace
112 x 112 template from its true landmarks, and writes ``pairs`` pairs alternating genuine (two different images of
one identity) and impostor (images of two different identities), so every contiguous fold of the 10-fold protocol
is balanced. The file is insightface's ``.bin`` (``utils.evaluation.pair_sets``).

``write_synthface_ijb`` writes insightface's IJB layout (``utils.evaluation.ijb``): each identity gets
``templates_per_identity`` templates of ``media_per_template`` media of ``images_per_media`` loose crops
(``loose_size`` pixels, unaligned). A media is one video-like clip: one SynthFaces render (pose, expression,
lighting, occlusion shared by the clip) from which every frame is made by a small random similarity jitter
(rotation, scale, shift), a brightness change and its own JPEG compression; the true landmarks follow the jitter.
The detector score of a crop stands in for a face detector's confidence: 1 minus twice the RMS residual of its five
landmarks after the least-squares similarity fit to the ArcFace template, relative to the template's eye distance,
clipped to [0.05, 1] (frontal, neutral faces fit the template best). Genuine pairs are all same-identity template
pairs; impostor pairs are all cross-identity template pairs, or a random sample of ``impostor_pairs`` of them.

The writers render with ``data_loader.synthface_render`` (``make_identity``, ``render_face``, each render seeded by
its own domain tag) and check their arguments with ``data_loader.synthface.check_int``.

CLI::

    python -m data_loader.protocol_writers pairs --out synth.bin --identities 100 --pairs 600
    python -m data_loader.protocol_writers ijb --out synth_ijb/IJBB --name ijbb --identities 50
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_loader.synthface import GENERATOR_VERSION, check_int
from data_loader.synthface_render import make_identity, render_face
from utils.checkpoint import atomic_write_text
from utils.evaluation.ijb import IJB_NAMES, meta_paths
from utils.evaluation.pair_sets import write_pair_set
from utils.face_align import ARCFACE_TEMPLATE_112, align_face, estimate_similarity, warp_affine

logger = logging.getLogger(__name__)

DEFAULT_FIRST_IDENTITY = 1_000_000
# Seed-sequence domain tags; SynthFaces itself uses 1 (prototypes), 2 (identities) and 3 (training images).
_TAG_PAIR_IMAGES, _TAG_PAIR_SAMPLING, _TAG_IJB_MEDIA, _TAG_IJB_FRAME, _TAG_IJB_PAIRS = 101, 102, 111, 112, 113
_TAG_IJB_MEDIA_NUISANCE = 114
_JPEG_QUALITY = 95
_FRAME_ROTATION_STD = 2.0  # degrees
_FRAME_SCALE_LOG_STD = 0.03
_FRAME_SHIFT_STD = 0.015  # in units of the crop side
_FRAME_BRIGHTNESS_LOG_STD = 0.05
_FRAME_JPEG_QUALITY = (60, 95)
_MIN_DETECTOR_SCORE = 0.05
_TEMPLATE_EYE_DISTANCE = float(np.linalg.norm(ARCFACE_TEMPLATE_112[1] - ARCFACE_TEMPLATE_112[0]))


def _encode(image: Image.Image, quality: int = _JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _check_population(seed: int, identities: int, first_identity: int, nuisance: float) -> None:
    """Checks the arguments both writers take: which SynthFaces identities to render, and how."""
    check_int("seed", seed, 0)
    check_int("identities", identities, 2)
    check_int("first_identity", first_identity, 0)
    if not isinstance(nuisance, (int, float)) or isinstance(nuisance, bool) or not 0.0 <= nuisance <= 3.0:
        raise ValueError(f"SynthFaces protocols: nuisance (--nuisance) must be a number in [0, 3], got {nuisance!r}")


def _render(
    seed: int, identity: int, stream: tuple[int, ...], size: int, nuisance: float
) -> tuple[Image.Image, np.ndarray]:
    """One SynthFaces render of `identity` (prototypes of `seed`).

    Args:
        seed: SynthFaces seed.
        identity: identity id.
        stream: domain tag and indices; the render's pose, expression, lighting, ... are drawn from the generator
            seeded with ``[seed, *stream]``.
        size: image side in pixels.
        nuisance: nuisance strength.

    Returns:
        The decoded RGB image and its (5, 2) true landmarks in pixels.
    """
    rng = np.random.default_rng([seed, *stream])
    data, landmarks = render_face(make_identity(seed, identity), rng, size, nuisance)
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB"), landmarks


def detector_score(landmarks: np.ndarray) -> float:
    """The synthetic detector score of a face from its five landmarks (module docstring).

    Args:
        landmarks: (5, 2) landmarks in image pixels.

    Returns:
        A score in [0.05, 1], rounded to 3 decimals.
    """
    matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE_112)
    mapped = np.asarray(landmarks, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]
    rms = math.sqrt(float(((mapped - ARCFACE_TEMPLATE_112) ** 2).sum(1).mean()))
    return round(min(1.0, max(_MIN_DETECTOR_SCORE, 1.0 - 2.0 * rms / _TEMPLATE_EYE_DISTANCE)), 3)


# ------------------------------------------------------------------------------------------------------- pair sets


def _aligned_face_bytes(seed: int, identity: int, index: int, size: int, nuisance: float) -> bytes:
    image, landmarks = _render(seed, identity, (_TAG_PAIR_IMAGES, identity, index), size, nuisance)
    return _encode(align_face(image, landmarks))


def write_synthface_pair_set(
    out_path: str | os.PathLike,
    *,
    seed: int = 0,
    identities: int,
    pairs: int,
    images_per_identity: int = 4,
    size: int = 112,
    first_identity: int = DEFAULT_FIRST_IDENTITY,
    nuisance: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Render held-out SynthFaces identities into an insightface ``.bin`` pair set.

    Args:
        out_path: the ``.bin`` file to write.
        seed: SynthFaces seed (its prototypes; use the training set's seed for the same population).
        identities: number of identities (>= 2).
        pairs: number of pairs (even; half genuine, half impostor, alternating).
        images_per_identity: images rendered per identity (>= 2); pairs draw from them.
        size: render side before alignment (the stored crops are 112 x 112).
        first_identity: id of the first identity (disjoint from the training ids 0 .. ids - 1).
        nuisance: SynthFaces nuisance strength.
        progress: show a tqdm bar.

    Returns:
        A summary dict (path, counts, parameters).
    """
    _check_population(seed, identities, first_identity, nuisance)
    check_int("pairs", pairs, 2)
    check_int("images_per_identity", images_per_identity, 2)
    check_int("size", size, 32, 1024)
    if pairs % 2:
        raise ValueError(f"SynthFaces protocols: pairs (--pairs) must be even (half genuine), got {pairs}")
    rng = np.random.default_rng([seed, _TAG_PAIR_SAMPLING, first_identity])
    members: list[tuple[int, int]] = []
    for index in range(pairs):
        if index % 2 == 0:
            person = int(rng.integers(identities))
            a, b = rng.choice(images_per_identity, 2, replace=False)
            members += [(person, int(a)), (person, int(b))]
        else:
            p, q = rng.choice(identities, 2, replace=False)
            a, b = rng.integers(images_per_identity, size=2)
            members += [(int(p), int(a)), (int(q), int(b))]
    rendered: dict[tuple[int, int], bytes] = {}
    for key in tqdm(sorted(set(members)), desc="pair-set faces", unit="img", disable=not progress):
        rendered[key] = _aligned_face_bytes(seed, first_identity + key[0], key[1], size, nuisance)
    issame = [index % 2 == 0 for index in range(pairs)]
    path = write_pair_set(out_path, [rendered[key] for key in members], issame)
    logger.info("wrote %d pairs (%d distinct images of %d identities) to %s", pairs, len(rendered), identities, path)
    return dict(
        path=str(path),
        pairs=pairs,
        genuine=pairs // 2,
        images=len(rendered),
        identities=identities,
        seed=seed,
        first_identity=first_identity,
        images_per_identity=images_per_identity,
        size=size,
        nuisance=nuisance,
    )


# -------------------------------------------------------------------------------------------------------------- IJB


def _media_frames(
    seed: int, identity: int, template: int, media: int, frames: int, size: int, nuisance: float
) -> list[tuple[bytes, np.ndarray]]:
    """The frames of one media clip: (JPEG bytes, (5, 2) landmarks) each."""
    base, landmarks = _render(seed, identity, (_TAG_IJB_MEDIA, identity, template, media), size, nuisance)
    centre = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    out = []
    for frame in range(frames):
        rng = np.random.default_rng([seed, _TAG_IJB_FRAME, identity, template, media, frame])
        angle = math.radians(float(rng.normal(0.0, _FRAME_ROTATION_STD)) * nuisance)
        scale = math.exp(float(rng.normal(0.0, _FRAME_SCALE_LOG_STD)) * nuisance)
        shift = rng.normal(0.0, _FRAME_SHIFT_STD * size, 2) * nuisance
        linear = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        matrix = np.concatenate([linear, (centre + shift - linear @ centre)[:, None]], axis=1)
        warped = np.asarray(warp_affine(base, matrix, size), dtype=np.float32)
        gain = math.exp(float(rng.normal(0.0, _FRAME_BRIGHTNESS_LOG_STD)) * nuisance)
        frame_img = Image.fromarray(np.clip(warped * gain, 0, 255).astype(np.uint8), "RGB")
        quality = int(rng.integers(_FRAME_JPEG_QUALITY[0], _FRAME_JPEG_QUALITY[1] + 1))
        out.append((_encode(frame_img, quality), landmarks @ linear.T + matrix[:, 2]))
    return out


def _template_pairs(
    owner: np.ndarray, impostor_pairs: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) 0-based template pairs (i < j) sorted, and their labels: all genuine pairs plus the impostors."""
    first, second = np.triu_indices(len(owner), 1)
    same = owner[first] == owner[second]
    cross = np.flatnonzero(~same)
    if impostor_pairs is not None:
        if impostor_pairs > len(cross):
            raise ValueError(
                f"SynthFaces protocols: impostor_pairs (--impostor-pairs) = {impostor_pairs} exceeds the "
                f"{len(cross)} cross-identity template pairs"
            )
        cross = np.sort(rng.choice(cross, impostor_pairs, replace=False))
    keep = np.sort(np.concatenate([np.flatnonzero(same), cross]))
    return np.stack([first[keep], second[keep]], 1), same[keep]


def write_synthface_ijb(
    out_dir: str | os.PathLike,
    name: str = "ijbb",
    *,
    seed: int = 0,
    identities: int,
    templates_per_identity: int = 2,
    media_per_template: int = 2,
    images_per_media: int = 2,
    impostor_pairs: int | None = None,
    loose_size: int = 144,
    first_identity: int = DEFAULT_FIRST_IDENTITY,
    nuisance: float = 1.0,
    long_clip_frames: int = 0,
    media_nuisance: tuple[float, float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Render held-out SynthFaces identities into an IJB benchmark folder (insightface layout).

    Two options stress template pooling: ``long_clip_frames`` makes the first media of every template one long clip
    (near-duplicate frames of one render) beside the others' ``images_per_media`` frames (1: single images), so a
    pooling that weighs images equally is dominated by the clip; ``media_nuisance`` draws each media's nuisance
    uniformly from a range, so quality varies within a template.

    Writes ``out_dir/meta/NAME_face_tid_mid.txt``, ``NAME_template_pair_label.txt``, ``NAME_name_5pts_score.txt``,
    ``out_dir/loose_crop/<k>.jpg`` and ``out_dir/synthface_ijb.json`` (parameters and counts), first into a
    temporary sibling folder that is then renamed.

    Args:
        out_dir: the benchmark folder to create (must not exist or be empty).
        name: ``ijbb`` or ``ijbc`` (the meta file prefix).
        seed: SynthFaces seed.
        identities: number of identities (>= 2).
        templates_per_identity: templates per identity (>= 2, so there are genuine pairs).
        media_per_template: media per template (>= 1).
        images_per_media: frames per media (>= 1).
        impostor_pairs: impostor template pairs to sample (default: all cross-identity pairs).
        loose_size: side of the loose crops in pixels.
        first_identity: id of the first identity (disjoint from the training ids).
        nuisance: SynthFaces nuisance strength (also scales the frame jitter).
        long_clip_frames: frames of the first media of each template (0: ``images_per_media`` like the others).
        media_nuisance: (low, high) range in [0, 3] of each media's nuisance, drawn per media (default: every media
            at ``nuisance``).
        progress: show a tqdm bar.

    Returns:
        The summary dict written to ``synthface_ijb.json``.
    """
    if name not in IJB_NAMES:
        raise ValueError(f"SynthFaces protocols: name (--name) must be one of {', '.join(IJB_NAMES)}, got {name!r}")
    _check_population(seed, identities, first_identity, nuisance)
    check_int("templates_per_identity", templates_per_identity, 2)
    check_int("media_per_template", media_per_template, 1)
    check_int("images_per_media", images_per_media, 1)
    check_int("loose_size", loose_size, 32, 1024)
    check_int("long_clip_frames", long_clip_frames, 0)
    if media_nuisance is not None:
        low, high = (float(v) for v in media_nuisance)
        if not 0.0 <= low <= high <= 3.0:
            raise ValueError(
                f"SynthFaces protocols: media_nuisance (--media-nuisance) must be LOW HIGH with 0 <= LOW <= HIGH <= 3, "
                f"got {list(media_nuisance)}"
            )
        media_nuisance = [low, high]
    if impostor_pairs is not None:
        check_int("impostor_pairs", impostor_pairs, 1)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"SynthFaces protocols: --out {out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        summary = _write_ijb_into(
            tmp,
            name,
            dict(
                seed=seed,
                identities=identities,
                templates_per_identity=templates_per_identity,
                media_per_template=media_per_template,
                images_per_media=images_per_media,
                impostor_pairs=impostor_pairs,
                loose_size=loose_size,
                first_identity=first_identity,
                nuisance=float(nuisance),
                long_clip_frames=long_clip_frames,
                media_nuisance=media_nuisance,
            ),
            progress,
        )
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info(
        "wrote %s: %d faces, %d templates, %d pairs (%d genuine) to %s",
        name,
        summary["counts"]["faces"],
        summary["counts"]["templates"],
        summary["counts"]["pairs"],
        summary["counts"]["genuine"],
        out,
    )
    return summary


def _media_nuisance(params: dict[str, Any], identity: int, template: int, media: int) -> float:
    """The nuisance of one media: ``nuisance``, or a uniform draw from ``media_nuisance`` seeded by the media."""
    if params.get("media_nuisance") is None:
        return params["nuisance"]
    low, high = params["media_nuisance"]
    rng = np.random.default_rng([params["seed"], _TAG_IJB_MEDIA_NUISANCE, identity, template, media])
    return float(rng.uniform(low, high))


def _write_ijb_into(root: Path, name: str, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    crops = root / "loose_crop"
    crops.mkdir(parents=True)
    faces, marks, owner = [], [], []
    media_id = 0
    templates = params["identities"] * params["templates_per_identity"]
    long_clip = params.get("long_clip_frames", 0)
    per_template = params["media_per_template"] * params["images_per_media"]
    if long_clip:
        per_template += long_clip - params["images_per_media"]
    with tqdm(total=templates * per_template, desc=f"{name} faces", unit="img", disable=not progress) as bar:
        for person in range(params["identities"]):
            identity = params["first_identity"] + person
            for template in range(params["templates_per_identity"]):
                template_id = len(owner) + 1
                owner.append(person)
                for media in range(params["media_per_template"]):
                    media_id += 1
                    frames = long_clip if long_clip and media == 0 else params["images_per_media"]
                    nuisance = _media_nuisance(params, identity, template, media)
                    clip = _media_frames(
                        params["seed"], identity, template, media, frames, params["loose_size"], nuisance
                    )
                    for data, landmarks in clip:
                        image_name = f"{len(faces) + 1}.jpg"
                        (crops / image_name).write_bytes(data)
                        faces.append(f"{image_name} {template_id} {media_id}")
                        coords = " ".join(f"{v:.3f}" for v in landmarks.ravel())
                        marks.append(f"{image_name} {coords} {detector_score(landmarks):.3f}")
                    bar.update(frames)
    rng = np.random.default_rng([params["seed"], _TAG_IJB_PAIRS, params["first_identity"]])
    pairs, labels = _template_pairs(np.asarray(owner), params["impostor_pairs"], rng)
    paths = meta_paths(root, name)
    paths["faces"].parent.mkdir()
    atomic_write_text(paths["faces"], "\n".join(faces) + "\n")
    atomic_write_text(paths["landmarks"], "\n".join(marks) + "\n")
    atomic_write_text(
        paths["pairs"], "".join(f"{a + 1} {b + 1} {int(same)}\n" for (a, b), same in zip(pairs.tolist(), labels))
    )
    summary = dict(
        generator="synthfaces",
        version=GENERATOR_VERSION,
        name=name,
        parameters=params,
        counts=dict(
            faces=len(faces),
            templates=templates,
            media=media_id,
            pairs=len(pairs),
            genuine=int(labels.sum()),
            impostor=int((~labels).sum()),
        ),
    )
    atomic_write_text(root / "synthface_ijb.json", json.dumps(summary, indent=2) + "\n")
    return summary


# -------------------------------------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Render verification protocols from held-out SynthFaces identities.")
    sub = parser.add_subparsers(dest="protocol", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output .bin file (pairs) or benchmark folder (ijb)")
    common.add_argument("--seed", type=int, default=0, help="SynthFaces seed (default: 0)")
    common.add_argument("--identities", type=int, required=True, help="number of held-out identities")
    common.add_argument(
        "--first-identity",
        type=int,
        default=DEFAULT_FIRST_IDENTITY,
        help=f"id of the first identity, disjoint from training ids (default: {DEFAULT_FIRST_IDENTITY})",
    )
    common.add_argument("--nuisance", type=float, default=1.0, help="SynthFaces nuisance strength (default: 1.0)")
    common.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pairs = sub.add_parser("pairs", parents=[common], help="an insightface .bin pair set")
    pairs.add_argument("--pairs", type=int, required=True, help="number of pairs, half genuine")
    pairs.add_argument("--images-per-identity", type=int, default=4, help="images per identity (default: 4)")
    pairs.add_argument("--size", type=int, default=112, help="render side before alignment (default: 112)")
    ijb = sub.add_parser("ijb", parents=[common], help="an IJB-style benchmark folder")
    ijb.add_argument("--name", choices=IJB_NAMES, default="ijbb", help="meta file prefix (default: ijbb)")
    ijb.add_argument("--templates-per-identity", type=int, default=2, help="templates per identity (default: 2)")
    ijb.add_argument("--media-per-template", type=int, default=2, help="media per template (default: 2)")
    ijb.add_argument("--images-per-media", type=int, default=2, help="frames per media (default: 2)")
    ijb.add_argument(
        "--impostor-pairs", type=int, default=None, help="impostor pairs to sample (default: all cross-identity)"
    )
    ijb.add_argument("--loose-size", type=int, default=144, help="loose crop side in pixels (default: 144)")
    ijb.add_argument(
        "--long-clip-frames",
        type=int,
        default=0,
        help="frames of the first media of each template, one long clip (default: 0, --images-per-media)",
    )
    ijb.add_argument(
        "--media-nuisance",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="draw each media's nuisance uniformly from [LOW, HIGH] (default: --nuisance for all)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    common = dict(
        seed=args.seed,
        identities=args.identities,
        first_identity=args.first_identity,
        nuisance=args.nuisance,
        progress=not args.no_progress,
    )
    if args.protocol == "pairs":
        write_synthface_pair_set(
            args.out, pairs=args.pairs, images_per_identity=args.images_per_identity, size=args.size, **common
        )
    else:
        write_synthface_ijb(
            args.out,
            args.name,
            templates_per_identity=args.templates_per_identity,
            media_per_template=args.media_per_template,
            images_per_media=args.images_per_media,
            impostor_pairs=args.impostor_pairs,
            loose_size=args.loose_size,
            long_clip_frames=args.long_clip_frames,
            media_nuisance=args.media_nuisance,
            **common,
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cli_parser = get_args_parser()
    cli_args = cli_parser.parse_args()
    try:
        sys.exit(main(cli_args))
    except (ValueError, FileExistsError) as err:
        cli_parser.error(str(err))
