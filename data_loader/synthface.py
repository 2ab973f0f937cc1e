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

Nothing but the generator's own temporary folder is ever deleted. A set is rendered into ``.DIR.partial-XXXX`` beside
DIR (holding the lock ``utils.run_lock`` takes for the life of the generating process) and renamed to DIR, which must
be missing or empty. A partial folder left by a killed generation is removed by a later one once its lock is free.
`ensure_synthfaces` reuses a folder only when it holds the preset and nothing else (removed files of it are named in
a warning); any other content is an error naming it.
"""

from __future__ import annotations

import argparse
import csv
import errno
import glob
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

from data_loader.datasets import _few
from data_loader.registry import DatasetError
from data_loader.synthface_render import NUISANCE, NUM_PROTOTYPES, make_identity, render_face
from data_loader.verification import RECORD_FILE
from utils.run_lock import LOCK_NAME, RunLock, RunLockError

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


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _remove_stale_partials(out: Path) -> None:
    """Removes the partial folders of `out` that killed generations left behind.

    Only a folder named with this module's prefix whose lock file records a holder (written by `RunLock` once it holds
    the lock) and is no longer held is removed; another process may still be rendering into one that is held.
    """
    for folder in sorted(out.parent.glob(glob.escape(_partial_prefix(out)) + "*")):
        lock_file = folder / LOCK_NAME
        if folder.is_symlink() or not folder.is_dir() or not lock_file.is_file() or lock_file.stat().st_size == 0:
            continue
        lock = RunLock(folder, "SynthFaces partial folder")
        try:
            lock.acquire()
        except RunLockError:
            continue
        try:
            shutil.rmtree(folder)
        finally:
            lock.release()
        logger.info("SynthFaces: removed %s, left by an interrupted generation", folder)


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
) -> dict[str, Any]:
    """Renders a SynthFaces set into `out_dir`, a missing or empty folder; nothing that exists is replaced or deleted.

    The set is written into a temporary folder beside `out_dir` (locked while this process lives) and renamed to
    `out_dir` at the end, so `out_dir` holds either nothing or the whole set.

    Args:
        out_dir: destination; must not exist or be empty.
        ids: number of identities.
        train_per_id: training images per identity.
        test_per_id: test images per identity.
        size: image side in pixels.
        seed: generation seed; the same seed gives byte-identical files.
        workers: processes to render with (the output does not depend on it).
        progress: show a tqdm progress bar.
        nuisance: nuisance strength (1 = benchmark default).

    Returns:
        The meta dict written to meta.json.

    Raises:
        ValueError: a parameter is out of range (names its flag).
        FileExistsError: `out_dir` is a file or a non-empty folder, or another process filled it meanwhile.
    """
    params = synthface_parameters(
        ids=ids, train_per_id=train_per_id, test_per_id=test_per_id, size=size, seed=seed, nuisance=nuisance
    )
    check_int("workers", workers, 1)
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"SynthFaces: --out {out} exists and is not a folder; choose another --out")
        if any(out.iterdir()):
            raise FileExistsError(
                f"SynthFaces: --out {out} is not empty; choose a new or empty folder (nothing in it is replaced or "
                "deleted)"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
    with RunLock(tmp, "SynthFaces partial folder"):
        try:
            (tmp / "set").mkdir()
            meta = _generate_into(tmp / "set", params, workers, progress)
            try:
                os.rename(tmp / "set", out)  # POSIX rename replaces a folder only when it is empty
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                raise FileExistsError(
                    f"SynthFaces: --out {out} was filled by another process while this one rendered; nothing in it "
                    "was replaced"
                ) from err
        finally:
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


def _set_paths(params: dict[str, Any]) -> set[str]:
    """Every folder and file of the set `params` describes, relative to its root and '/'-separated."""
    counts = (params["train_per_id"], params["test_per_id"])
    id_width, file_width = _name_widths(params["ids"], max(counts))
    paths = {"meta.json", "landmarks.csv", *SPLITS}
    for split, count in zip(SPLITS, counts):
        for identity in range(params["ids"]):
            folder = f"{split}/id_{identity:0{id_width}d}"
            paths.add(folder)
            paths.update(f"{folder}/{index:0{file_width}d}.jpg" for index in range(count))
    return paths


def _found_paths(root: Path) -> set[str]:
    """Every folder and file under `root` (links not followed) but the image verification record that
    data_loader.verification keeps beside the data (and a temporary file of it a kill may leave)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        found.update((rel / name).as_posix() for name in dirs + files)
    record_tmp = f".{RECORD_FILE}."
    return {p for p in found if p != RECORD_FILE and not (p.startswith(record_tmp) and p.endswith(".tmp"))}


def _stored_parameters(root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The valid generation parameters and the generator version of the SynthFaces set in `root` (None, None: no
    readable SynthFaces meta.json; None parameters: invalid ones)."""
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None, None
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR_NAME:
        return None, None
    try:
        return synthface_parameters(**meta["parameters"]), str(meta.get("version"))
    except (KeyError, TypeError, ValueError):
        return None, str(meta.get("version"))


def _by_depth(paths: set[str]) -> list[str]:
    return sorted(paths, key=lambda p: (p.count("/"), p))


def _foreign_content(root: Path, preset: str, params: dict[str, Any]) -> str | None:
    """What keeps the non-empty folder `root` from being the preset's set, with the ways out; None when it holds
    exactly that set."""
    stored, version = _stored_parameters(root)
    extra = _by_depth(_found_paths(root) - (_set_paths(stored) if stored is not None else set()))
    problems = []
    if version is None:
        problems.append("it holds no SynthFaces meta.json")
    elif stored is None:
        problems.append("its meta.json holds no valid SynthFaces parameters")
    elif version != GENERATOR_VERSION:
        problems.append(f"it was rendered by SynthFaces generator version {version}, {preset} by {GENERATOR_VERSION}")
    if stored is not None and stored != params:
        differing = ", ".join(f"{k} {stored[k]} (preset: {v})" for k, v in params.items() if stored[k] != v)
        problems.append(f"it holds a SynthFaces set made with other parameters: {differing}")
    if extra:
        problems.append(f"{len(extra)} file(s) or folder(s) that are not part of a SynthFaces set: {_few(extra)}")
    if not problems:
        return None
    ways = [f"pass another --data-path (a new or empty folder, where {preset} is generated)"]
    if extra and stored == params and version == GENERATOR_VERSION:
        ways.append(f"move the files listed out of {root}")
    if stored is not None and stored != params:
        same = [name for name, values in SYNTH_PRESETS.items() if synthface_parameters(**values) == stored]
        if same and version == GENERATOR_VERSION and not extra:
            ways.append(f"use the set that is there with --dataset {same[0]}")
        else:
            ways.append(
                "use the set that is there with --dataset identity_folders (N from its identity folders; --num-known "
                "sets how many are known, default N // 2)"
            )
    if stored is None:
        ways.append("pass --dataset identity_folders if it holds your own train/<id>/ and test/<id>/ faces")
    return (
        f"SynthFaces: {root} does not hold exactly the preset {preset}, and nothing in it is replaced or deleted: "
        f"{'; '.join(problems)}. Either {', or '.join(ways)}."
    )


def ensure_synthfaces(root: str | os.PathLike, preset: str, *, workers: int = 1, progress: bool = True) -> Path:
    """Makes sure `root` holds the SynthFaces preset `preset`: generates it into a missing or empty folder, reuses a
    folder that holds it and nothing else, and refuses anything else (nothing is ever replaced or deleted). Files of
    the preset that were removed are named in a warning and the rest is used (extraction and SSK compare the listing
    with the one the checkpoint records).

    Call it on one process (e.g. the primary rank) and synchronise the others afterwards.

    Args:
        root: dataset folder.
        preset: a key of `SYNTH_PRESETS`.
        workers: processes to render with.
        progress: show a tqdm progress bar.

    Returns:
        `root` as a Path.

    Raises:
        DatasetError: an unknown preset, or `root` is a file or holds anything but the preset (another SynthFaces
            set, extra files); the message names the difference and the ways out.
    """
    if preset not in SYNTH_PRESETS:
        raise DatasetError(f"SynthFaces: unknown preset {preset!r}; expected one of {sorted(SYNTH_PRESETS)}")
    root = Path(root)
    params = synthface_parameters(**SYNTH_PRESETS[preset])
    if (root.exists() or root.is_symlink()) and not root.is_dir():
        raise DatasetError(f"SynthFaces: {root} is not a folder; pass a --data-path that is a folder or does not exist")
    if root.is_dir() and any(root.iterdir()):
        foreign = _foreign_content(root, preset, params)
        if foreign is not None:
            raise DatasetError(foreign)
        missing = _by_depth(_set_paths(params) - _found_paths(root))
        if missing:
            logger.warning(
                "SynthFaces: %d file(s) of preset %s are missing from %s: %s; using what is there, which is not the "
                "preset any more (pass a new --data-path to generate it whole)",
                len(missing),
                preset,
                root,
                _few(missing),
            )
        else:
            logger.info("SynthFaces: %s already holds preset %s", root, preset)
        return root
    logger.info("SynthFaces: generating preset %s into %s", preset, root)
    try:
        generate_synthfaces(root, workers=workers, progress=progress, **params)
    except FileExistsError:
        if not root.is_dir() or _foreign_content(root, preset, params) is not None:
            raise
        logger.info("SynthFaces: another process generated preset %s into %s meanwhile", preset, root)
    return root


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``python -m data_loader.synthface``."""
    parser = argparse.ArgumentParser(description="Render the SynthFaces benchmark.", add_help=True)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty; nothing is replaced)")
    parser.add_argument("--ids", type=int, required=True, help="number of identities")
    parser.add_argument("--train-per-id", type=int, required=True, help="training images per identity")
    parser.add_argument("--test-per-id", type=int, required=True, help="test images per identity")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default: 112)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default: 1)")
    parser.add_argument("--nuisance", type=float, default=1.0, help="nuisance strength (default: 1.0)")
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
