"""Build a GFD benchmark (YTF-N or CASIA-N) as ``<out>/train/<identity>/*`` and ``<out>/test/<identity>/*``.

YTF (docs/method.md, section 2.2): identity folders sorted by name, one ``random.Random(seed)`` stream: keep
identities with >= 100 images, ``sample`` N, then per drawn identity int(test_fraction * n) random images go to test/
and the rest to train/; files are copied as they are (images in per-video sub-folders are included, named
``<video>_<file>``).

CASIA (docs/method.md, section 2.3): from the insightface pair ``train.rec`` + ``train.idx`` (or per-identity
folders): keep identities with >= 50 images, ``sample`` N in ascending order and relabel them 0..N-1 in draw order,
per identity shuffle its images, the first int((1 - test_fraction) * n) to train/ and the rest to test/. Folders are
named ``<draw index>_<identity>`` so that sorted order is draw order (known = first half); records are written as
JPEG. This is the same selection ``build_gcd_datasets`` applies when it reads the RecordIO pair directly.

Usage::

    python -m data_loader.build_gfd --source ytf --src aligned_images_DB --out youtube_faces_1000 --ids 1000
    python -m data_loader.build_gfd --source casia --src faces_webface_112x112 --out casia_faces_1000 --ids 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from data_loader.datasets import IMG_EXTENSIONS, casia_class_name, casia_split, list_class_dirs
from data_loader.recordio import RecordIOReader
from data_loader.registry import DatasetError

logger = logging.getLogger(__name__)

SOURCES = ("ytf", "casia")
DEFAULT_MIN_IMAGES = {"ytf": 100, "casia": 50}
_DISPLAY = {"ytf": "YTF", "casia": "CASIA"}
_TABLE_COLUMNS = ("Dataset", "Known IDs", "Unknown IDs", "Train images", "Test images")


def _identity_images(identity_dir: Path) -> list[str]:
    """Image paths under ``identity_dir``, relative to it, recursively (per-video sub-folders), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(identity_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, identity_dir)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


def _identity_groups(src: Path, progress: bool) -> dict[str, list[str]]:
    if not src.is_dir():
        raise DatasetError(f"--src {src} is not a folder; expected <src>/<identity>/<images>")
    names = list_class_dirs(src)
    if not names:
        raise DatasetError(f"--src {src} has no identity folders; expected <src>/<identity>/<images>")
    return {name: _identity_images(src / name) for name in tqdm(names, desc="listing identities", disable=not progress)}


def ytf_split(
    groups: dict[str, list[str]], num_ids: int, *, seed: int = 42, min_images: int = 100, test_fraction: float = 0.2
) -> list[tuple[str, list[str], list[str]]]:
    """YTF selection: one ``random.Random(seed)`` stream over the sorted identity names.

    Args:
        groups: identity name -> its image files (sorted).
        num_ids: N.
        seed: selection seed.
        min_images: minimum images per eligible identity.
        test_fraction: per identity, int(test_fraction * n) random images go to test.

    Returns:
        ``[(identity, train files, test files)]`` in draw order, file lists sorted.

    Raises:
        DatasetError: fewer than ``num_ids`` eligible identities.
    """
    eligible = sorted(name for name, files in groups.items() if len(files) >= min_images)
    if len(eligible) < num_ids:
        raise DatasetError(
            f"only {len(eligible)} of {len(groups)} identities have >= {min_images} images (--min-images), but "
            f"--ids {num_ids} were requested"
        )
    rng = random.Random(seed)
    selection = []
    for name in rng.sample(eligible, num_ids):
        files = sorted(groups[name])
        test = set(rng.sample(files, int(test_fraction * len(files))))
        selection.append((name, [f for f in files if f not in test], sorted(test)))
    return selection


def _prepare_out(out: Path, overwrite: bool) -> None:
    for split in ("train", "test"):
        target = out / split
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise DatasetError(
                    f"{target} already exists and is not empty; choose another --out or pass --overwrite"
                )
            shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)


def _run_jobs(jobs: list[tuple[Callable[..., object], tuple]], workers: int, progress: bool) -> None:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fn, *fn_args) for fn, fn_args in jobs]
        for future in tqdm(futures, desc="writing images", disable=not progress, mininterval=2.0):
            future.result()


def _write_record_image(reader: RecordIOReader, key: int, dst: Path) -> None:
    """Write record ``key`` as a JPEG file (JPEG bytes as they are, other formats re-encoded)."""
    _, data = reader.read(key)
    if data[:2] == b"\xff\xd8":
        dst.write_bytes(data)
        return
    reader.read_image(key).save(dst, format="JPEG", quality=95)


def _stats(source: str, selection: list[tuple], num_ids: int) -> dict:
    return {
        "dataset": f"{_DISPLAY[source]}-{num_ids}",
        "known_ids": num_ids // 2,
        "unknown_ids": num_ids - num_ids // 2,
        "train_images": sum(len(train) for _, train, _ in selection),
        "test_images": sum(len(test) for _, _, test in selection),
    }


def format_stats_table(rows: list[dict]) -> str:
    """Markdown table in the reference README form.

    Args:
        rows: statistics dicts as returned by :func:`build_gfd`.

    Returns:
        ``| Dataset | Known IDs | Unknown IDs | Train images | Test images |`` with one line per row.
    """
    lines = ["| " + " | ".join(_TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in _TABLE_COLUMNS) + "|"]
    for row in rows:
        values = (row["known_ids"], row["unknown_ids"], row["train_images"], row["test_images"])
        lines.append(f"| {row['dataset']} | " + " | ".join(f"{v:,}" for v in values) + " |")
    return "\n".join(lines)


def _rec_pair(src: Path) -> tuple[Path, Path] | None:
    if src.is_file() and src.suffix == ".rec":
        return src, src.with_suffix(".idx")
    if (src / "train.rec").exists():
        return src / "train.rec", src / "train.idx"
    return None


def build_gfd(
    source: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    num_ids: int,
    *,
    seed: int = 42,
    min_images: int | None = None,
    test_fraction: float = 0.2,
    workers: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build YTF-N or CASIA-N under ``out`` and return its statistics.

    Args:
        source: ``"ytf"`` or ``"casia"``.
        src: YTF: per-identity folders; CASIA: folder with ``train.rec`` + ``train.idx`` (or the ``.rec`` path), or
            per-identity folders.
        out: output root (gets ``train/``, ``test/`` and ``gfd_build.json``).
        num_ids: N, identities to draw.
        seed: selection seed (42 as in the reference).
        min_images: minimum images per identity (default 100 for ytf, 50 for casia).
        test_fraction: per-identity test fraction.
        workers: threads writing files.
        overwrite: replace existing ``train/`` and ``test/`` under ``out``.
        progress: show tqdm bars.

    Returns:
        ``{"dataset", "known_ids", "unknown_ids", "train_images", "test_images"}``.

    Raises:
        DatasetError: bad source, missing input, fewer eligible identities than ``num_ids``, non-empty output.
    """
    if source not in SOURCES:
        raise DatasetError(f"--source {source!r} is not supported; choose one of {', '.join(SOURCES)}")
    if num_ids < 2:
        raise DatasetError(f"--ids must be at least 2 (known and unknown identities), got {num_ids}")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    min_images = DEFAULT_MIN_IMAGES[source] if min_images is None else min_images
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DatasetError(f"--src {src} does not exist")

    pair = _rec_pair(src) if source == "casia" else None
    if pair is not None:
        reader = RecordIOReader(*pair)
        selection = casia_split(
            reader.scan_identities(progress=progress),
            num_ids,
            seed=seed,
            min_images=min_images,
            train_fraction=1.0 - test_fraction,
            source=str(pair[0]),
        )
    else:
        groups = _identity_groups(src, progress)
        if source == "ytf":
            selection = ytf_split(groups, num_ids, seed=seed, min_images=min_images, test_fraction=test_fraction)
        else:
            selection = casia_split(
                groups, num_ids, seed=seed, min_images=min_images, train_fraction=1.0 - test_fraction, source=str(src)
            )

    _prepare_out(out, overwrite)
    jobs = []
    for index, (identity, train_items, test_items) in enumerate(selection):
        folder = str(identity) if source == "ytf" else casia_class_name(index, identity)
        for split, items in (("train", train_items), ("test", test_items)):
            target = out / split / folder
            target.mkdir(parents=True, exist_ok=True)
            for item in items:
                if pair is not None:
                    jobs.append((_write_record_image, (reader, item, target / f"{item:08d}.jpg")))
                else:
                    jobs.append((shutil.copyfile, (src / str(identity) / item, target / item.replace(os.sep, "_"))))
    _run_jobs(jobs, workers, progress)

    stats = _stats(source, selection, num_ids)
    params = {
        "source": source,
        "src": str(src),
        "ids": num_ids,
        "seed": seed,
        "min_images": min_images,
        "test_fraction": test_fraction,
    }
    (out / "gfd_build.json").write_text(json.dumps({"params": params, "stats": stats}, indent=2))
    logger.info("built %s under %s", stats["dataset"], out)
    return stats


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line parser of the builder."""
    parser = argparse.ArgumentParser(description="Build a GFD benchmark (YTF-N or CASIA-N)", add_help=add_help)
    parser.add_argument("--source", required=True, choices=SOURCES, help="source dataset")
    parser.add_argument(
        "--src", required=True, help="source folder (YTF identities; CASIA train.rec/.idx or identities)"
    )
    parser.add_argument("--out", required=True, help="output benchmark root")
    parser.add_argument("--ids", required=True, type=int, help="number of identities N")
    parser.add_argument("--seed", type=int, default=42, help="selection seed (default: 42)")
    parser.add_argument(
        "--min-images", type=int, default=None, help="minimum images per identity (default: 100 ytf, 50 casia)"
    )
    parser.add_argument("--test-fraction", type=float, default=0.2, help="per-identity test fraction (default: 0.2)")
    parser.add_argument("--workers", type=int, default=8, help="file-writing threads (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing train/ and test/ under --out")
    return parser


def main(args: argparse.Namespace) -> int:
    """Build the benchmark and print its statistics table; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        stats = build_gfd(
            args.source,
            args.src,
            args.out,
            args.ids,
            seed=args.seed,
            min_images=args.min_images,
            test_fraction=args.test_fraction,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except DatasetError as err:
        logger.error("%s", err)
        return 2
    print(format_stats_table([stats]))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
