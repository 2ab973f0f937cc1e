"""SynthFaces data sets: the generation parameters and presets, the writer of a data set folder, and its CLI.

Faces are rendered by ``data_loader.synthface_render``. Each image comes from its own numpy Generator seeded with
(seed, split, identity, image), so the files are byte-identical for the same seed whatever the number of worker
processes.

Layout written by `generate_synthfaces` (class order = sorted identity folder names)::

    DIR/train/id_0000/000.jpg ...   DIR/test/id_0000/000.jpg ...
    DIR/landmarks.csv   split,identity,file,x0,y0,...,x4,y4 (eye, eye, nose tip, mouth corner, mouth corner;
                        output pixel coordinates, pixel centres at integers, after every geometric transform)
    DIR/meta.json       generator version, seed, parameters, counts

CLI: ``python -m data_loader.synthface --out DIR --ids N --train-per-id A --test-per-id B --size 112 --seed S``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from tqdm import tqdm

from data_loader.synthface_render import NUISANCE, NUM_PROTOTYPES, make_identity, render_face

logger = logging.getLogger(__name__)

GENERATOR_NAME = "synthfaces"
# Version of the rendered output: bump it whenever data_loader.synthface_render changes the bytes it writes.
GENERATOR_VERSION = "1.0.0"
SPLITS = ("train", "test")
LANDMARK_NAMES = ("eye_left", "eye_right", "nose_tip", "mouth_left", "mouth_right")
LANDMARK_COLUMNS = tuple(f"{axis}{i}" for i in range(len(LANDMARK_NAMES)) for axis in ("x", "y"))

SYNTH_PRESETS: dict[str, dict[str, int]] = {
    "synthfaces_tiny": dict(ids=8, train_per_id=6, test_per_id=2, size=112, seed=0),
    "synthfaces_quick": dict(ids=40, train_per_id=40, test_per_id=10, size=112, seed=0),
}

# Seed-sequence domain tag of the image streams (data_loader.synthface_render uses 1 and 2).
_TAG_IMAGE = 3
_MIN_SIZE, _MAX_SIZE = 32, 1024


def _image_rng(seed: int, split: str, identity: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TAG_IMAGE, SPLITS.index(split), identity, index])


def _name_widths(ids: int, per_id: int) -> tuple[int, int]:
    return max(4, len(str(ids - 1))), max(3, len(str(per_id - 1)))


@dataclass(frozen=True)
class _IdentityTask:
    out_dir: str
    identity: int
    ids: int
    counts: tuple[int, int]
    size: int
    seed: int
    nuisance: float


def _render_identity(task: _IdentityTask) -> list[list[Any]]:
    """Renders and writes every image of one identity; returns its landmark rows."""
    face = make_identity(task.seed, task.identity)
    id_width, file_width = _name_widths(task.ids, max(task.counts))
    name = f"id_{task.identity:0{id_width}d}"
    rows = []
    for split, count in zip(SPLITS, task.counts):
        folder = Path(task.out_dir) / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = _image_rng(task.seed, split, task.identity, index)
            data, landmarks = render_face(face, rng, task.size, task.nuisance)
            file = f"{index:0{file_width}d}.jpg"
            (folder / file).write_bytes(data)
            rows.append([split, name, file, *(f"{v:.2f}" for v in landmarks.ravel())])
    return rows


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """Checks that a SynthFaces argument is an integer (not a bool) in range; the error names its CLI flag.

    Args:
        name: argument name; the flag is ``--`` + the name with dashes for underscores.
        value: the value to check.
        minimum: smallest allowed value.
        maximum: largest allowed value (None: no upper bound).

    Raises:
        ValueError: `value` is not an integer in [minimum, maximum].
    """
    flag = "--" + name.replace("_", "-")
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"SynthFaces: {name} ({flag}) must be an integer {expected}, got {value!r}")


def synthface_parameters(
    *, ids: int, train_per_id: int, test_per_id: int, size: int = 112, seed: int = 0, nuisance: float = 1.0
) -> dict[str, Any]:
    """Validates and normalises generation parameters (the `parameters` entry of meta.json).

    Args:
        ids: number of identities (>= 1).
        train_per_id: training images per identity (>= 1).
        test_per_id: test images per identity (>= 1).
        size: image side in pixels (32..1024).
        seed: non-negative seed.
        nuisance: nuisance strength (>= 0; 1 = benchmark default).

    Returns:
        The parameter dict.
    """
    check_int("ids", ids, 1)
    check_int("train_per_id", train_per_id, 1)
    check_int("test_per_id", test_per_id, 1)
    check_int("size", size, _MIN_SIZE, _MAX_SIZE)
    check_int("seed", seed, 0)
    if not isinstance(nuisance, (int, float)) or isinstance(nuisance, bool) or not 0.0 <= nuisance <= 3.0:
        raise ValueError(f"SynthFaces: nuisance (--nuisance) must be a number in [0, 3], got {nuisance!r}")
    return dict(
        ids=int(ids),
        train_per_id=int(train_per_id),
        test_per_id=int(test_per_id),
        size=int(size),
        seed=int(seed),
        nuisance=float(nuisance),
    )


def _is_synthfaces_dir(path: Path) -> bool:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR_NAME


def generate_synthfaces(
    out_dir: str | os.PathLike,
    *,
    ids: int,
    train_per_id: int,
    test_per_id: int,
    size: int = 112,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    nuisance: float = 1.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Renders a SynthFaces set into `out_dir` (written to a temporary sibling folder, then renamed).

    Args:
        out_dir: destination; must not exist or be empty, unless `overwrite` and it holds an earlier SynthFaces set.
        ids: number of identities.
        train_per_id: training images per identity.
        test_per_id: test images per identity.
        size: image side in pixels.
        seed: generation seed; the same seed gives byte-identical files.
        workers: processes to render with (the output does not depend on it).
        progress: show a tqdm progress bar.
        nuisance: nuisance strength (1 = benchmark default).
        overwrite: replace an existing SynthFaces set in `out_dir`.

    Returns:
        The meta dict written to meta.json.
    """
    params = synthface_parameters(
        ids=ids, train_per_id=train_per_id, test_per_id=test_per_id, size=size, seed=seed, nuisance=nuisance
    )
    check_int("workers", workers, 1)
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"SynthFaces: --out {out} exists and is not a folder")
        if any(out.iterdir()) and not (overwrite and _is_synthfaces_dir(out)):
            raise FileExistsError(
                f"SynthFaces: --out {out} exists and is not empty; expected a new or empty folder "
                "(or an earlier SynthFaces set with overwrite=True)"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        meta = _generate_into(tmp, params, workers, progress)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("SynthFaces: wrote %d images of %d identities to %s", meta["counts"]["images"], ids, out)
    return meta


def _generate_into(out: Path, params: dict[str, Any], workers: int, progress: bool) -> dict[str, Any]:
    counts = (params["train_per_id"], params["test_per_id"])
    tasks = [
        _IdentityTask(str(out), i, params["ids"], counts, params["size"], params["seed"], params["nuisance"])
        for i in range(params["ids"])
    ]
    rows: list[list[Any]] = []
    bar = tqdm(total=params["ids"] * sum(counts), unit="img", desc="SynthFaces", disable=not progress)
    with bar:
        if workers == 1:
            for task in tasks:
                rows.extend(_render_identity(task))
                bar.update(sum(counts))
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                for task_rows in pool.imap(_render_identity, tasks, chunksize=1):
                    rows.extend(task_rows)
                    bar.update(sum(counts))
    rows.sort(key=lambda r: (SPLITS.index(r[0]), r[1], r[2]))
    with open(out / "landmarks.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["split", "identity", "file", *LANDMARK_COLUMNS])
        writer.writerows(rows)
    id_width, _ = _name_widths(params["ids"], max(counts))
    meta = dict(
        generator=GENERATOR_NAME,
        version=GENERATOR_VERSION,
        seed=params["seed"],
        parameters=params,
        counts=dict(
            identities=params["ids"],
            train=params["ids"] * counts[0],
            test=params["ids"] * counts[1],
            images=params["ids"] * sum(counts),
        ),
        identities=[f"id_{i:0{id_width}d}" for i in range(params["ids"])],
        num_prototypes=NUM_PROTOTYPES,
        nuisance_config=asdict(NUISANCE),
        landmarks=dict(file="landmarks.csv", names=list(LANDMARK_NAMES), columns=list(LANDMARK_COLUMNS)),
        libraries=dict(numpy=np.__version__, pillow=PIL.__version__),
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _meta_matches(root: Path, params: dict[str, Any]) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("generator") == GENERATOR_NAME
        and meta.get("version") == GENERATOR_VERSION
        and meta.get("parameters") == params
    )


def ensure_synthfaces(root: str | os.PathLike, preset: str, *, workers: int = 1, progress: bool = True) -> Path:
    """Makes sure `root` holds the SynthFaces preset `preset`, generating it only when needed.

    Call it on one process (e.g. the primary rank) and synchronise the others afterwards.

    Args:
        root: dataset folder (created if missing; an earlier SynthFaces set with other parameters is replaced).
        preset: a key of `SYNTH_PRESETS`.
        workers: processes to render with.
        progress: show a tqdm progress bar.

    Returns:
        `root` as a Path.
    """
    if preset not in SYNTH_PRESETS:
        raise ValueError(f"SynthFaces: unknown preset {preset!r}; expected one of {sorted(SYNTH_PRESETS)}")
    root = Path(root)
    params = synthface_parameters(**SYNTH_PRESETS[preset])
    if _meta_matches(root, params):
        logger.info("SynthFaces: %s already holds preset %s", root, preset)
        return root
    if root.exists() and root.is_dir() and any(root.iterdir()) and not _is_synthfaces_dir(root):
        raise FileExistsError(
            f"SynthFaces: {root} is not empty and holds no SynthFaces meta.json; expected an empty or SynthFaces folder"
        )
    logger.info("SynthFaces: generating preset %s into %s", preset, root)
    generate_synthfaces(root, workers=workers, progress=progress, overwrite=True, **params)
    return root


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``python -m data_loader.synthface``."""
    parser = argparse.ArgumentParser(description="Render the SynthFaces benchmark.", add_help=True)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--ids", type=int, required=True, help="number of identities")
    parser.add_argument("--train-per-id", type=int, required=True, help="training images per identity")
    parser.add_argument("--test-per-id", type=int, required=True, help="test images per identity")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default: 112)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default: 1)")
    parser.add_argument("--nuisance", type=float, default=1.0, help="nuisance strength (default: 1.0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier SynthFaces set in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(args: argparse.Namespace) -> int:
    """Generates the set the parsed arguments describe; returns the exit status (0)."""
    generate_synthfaces(
        args.out,
        ids=args.ids,
        train_per_id=args.train_per_id,
        test_per_id=args.test_per_id,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
        nuisance=args.nuisance,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    cli_args = parser.parse_args()
    try:
        sys.exit(main(cli_args))
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
