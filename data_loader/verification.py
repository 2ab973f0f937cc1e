"""Image verification done once per data tree, kept in a small record and reused while the files are unchanged.

Opening every image header (PIL ``verify``) of a benchmark with a quarter of a million images takes minutes; doing it
on every rank of every script is wasted time. :func:`find_corrupt` verifies a benchmark root once and writes a record
(compact JSON) of what it checked, in groups:

- an image folder (``train/<class>``): a fingerprint (SHA-1 over each image file's name, size and mtime), the
  unreadable files with their errors and the images smaller than :data:`MIN_IMAGE_SIDE` with their sizes;
- a RecordIO pair: a fingerprint of the ``.rec`` and ``.idx`` sizes and mtimes, the record keys verified so far (as
  ranges), the unreadable keys and the small images' keys.

A later run verifies only the folders whose fingerprint changed (a file added, removed, resized or touched) and the
record keys not verified yet; the rest, including which images were bad, comes from the record, so skipping corrupt
images gives the same result every time. The record lives next to the data (``<root>/.facegcd_verified.json``) when
the root is writable, else under ``$XDG_CACHE_HOME/facegcd/verified/`` (default ``~/.cache``) in a file named by a
hash of the absolute root. Under torch.distributed the primary rank verifies and writes; the other ranks wait at a
barrier and then read the record, so every rank must call :func:`find_corrupt`.

A file rewritten with the same size and mtime is not noticed here; a decoding error while loading it still stops the
run with the file's name.

Images with a side under :data:`MIN_IMAGE_SIDE` (8 px) are named in one warning at every run (count and first paths).
They still load: the transforms resize any image to the input size. But below 8 px a face is a few blobs with no
identity left (the face benchmarks hold 112 px crops, the smallest generic set, CIFAR, 32 px images), so such a file
is a placeholder, a broken crop or a wrong file far more often than data; a warning and not an error, because the run
works and a resolution study may want it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from utils.checkpoint import atomic_write_text
from utils.distributed import barrier, get_rank, get_world_size, is_primary
from utils.images import DECODE_ERRORS

logger = logging.getLogger(__name__)

RECORD_FILE = ".facegcd_verified.json"
RECORD_VERSION = 2  # 2: entries record the small images ("small")
MIN_IMAGE_SIDE = 8  # images with a smaller width or height are named in a warning (module docstring)


@dataclass
class VerifyGroup:
    """Images verified and recorded together: one image folder, or the images of one RecordIO pair.

    Args:
        name: record key, the folder or ``.rec`` path relative to the root ('/'-separated).
        fingerprint: changes whenever an image of the group may have changed.
        items: id of each image, stable across runs (file name, or record key as text).
        positions: listing position of each image in its source.
        keyed: True = only the listed items are verified and the record keeps which ones (RecordIO); False = the
            fingerprint covers every image of the group (folders).
    """

    name: str
    fingerprint: str
    items: list[str]
    positions: list[int]
    keyed: bool = False


class VerifiableSource(Protocol):
    """An image source that can be verified: its images are addressed by listing position."""

    def verify(self, i: int) -> tuple[int, int]:
        """Parse image ``i``'s header and return its (width, height); raises one of ``DECODE_ERRORS`` when it is not a
        readable image."""

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from (for messages)."""

    def verify_groups(self, root: Path) -> list[VerifyGroup]:
        """The source's images grouped as the record stores them."""


def _digest(lines: Iterable[str]) -> str:
    sha = hashlib.sha1()
    for line in lines:
        sha.update(line.encode("utf-8", "surrogateescape"))
    return sha.hexdigest()


def _relative(path: str | os.PathLike, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def folder_group(root: Path, folder: str, names: Sequence[str], positions: Sequence[int]) -> VerifyGroup:
    """The group of one image folder, fingerprinted by each file's name, size and mtime (one ``stat`` per file).

    Args:
        root: the benchmark root.
        folder: the folder holding the images.
        names: the image file names, in listing order.
        positions: listing position of each file in its source.
    """
    lines = []
    for name in names:
        st = os.stat(os.path.join(folder, name))
        lines.append(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n")
    return VerifyGroup(_relative(folder, root), _digest(lines), list(names), list(positions))


def recordio_group(root: Path, rec_path: Path, idx_path: Path, keys: Sequence[int]) -> VerifyGroup:
    """The group of the images ``keys`` of a RecordIO pair, fingerprinted by the sizes and mtimes of both files.

    Args:
        root: the benchmark root.
        rec_path: the ``.rec`` file.
        idx_path: the ``.idx`` file.
        keys: record keys in listing order.
    """
    lines = []
    for path in (rec_path, idx_path):
        st = os.stat(path)
        lines.append(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n")
    return VerifyGroup(
        _relative(rec_path, root), _digest(lines), [str(k) for k in keys], list(range(len(keys))), keyed=True
    )


def cache_dir() -> Path:
    """Folder for records of roots that cannot be written: ``$XDG_CACHE_HOME/facegcd/verified`` (``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "facegcd" / "verified"


def record_locations(root: str | os.PathLike) -> list[Path]:
    """Where the record of ``root`` is kept, in order of preference: next to the data, then the user cache."""
    real = os.path.realpath(root)
    key = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return [Path(real) / RECORD_FILE, cache_dir() / f"{key}.json"]


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint"), str):
        return False
    for field in ("bad", "small"):
        found = entry.get(field)
        if not isinstance(found, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in found.items()):
            return False
    keys = entry.get("keys", [])
    return isinstance(keys, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(k, int) for k in r) and r[0] <= r[1] for r in keys
    )


def _read_record(path: Path, root: str) -> dict[str, dict]:
    """The groups of the record at ``path``; empty when it is missing, unreadable, or not a record of ``root``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        logger.warning("ignoring the verification record %s, which cannot be read: %s", path, err)
        return {}
    if isinstance(data, dict) and isinstance(data.get("version"), int) and 0 < data["version"] < RECORD_VERSION:
        logger.info("the verification record %s is of an older version; verifying again", path)
        return {}
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION or not isinstance(data.get("groups"), dict):
        logger.warning("ignoring the verification record %s: not a version %d record", path, RECORD_VERSION)
        return {}
    # a record next to the data describes that tree wherever it is mounted; a cache file must name the root
    if path.parent != Path(root) and data.get("root") != root:
        return {}
    groups = {name: entry for name, entry in data["groups"].items() if _valid_entry(entry)}
    if len(groups) != len(data["groups"]):
        logger.warning("ignoring %d malformed entries of %s", len(data["groups"]) - len(groups), path)
    return groups


def _merge_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """Inclusive ``[first, last]`` key ranges merged into the fewest disjoint ones, ascending."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged


def _in_ranges(keys: np.ndarray, ranges: list[list[int]]) -> np.ndarray:
    """Bool mask: which ``keys`` lie in one of the disjoint ascending ``ranges``."""
    if not ranges:
        return np.zeros(len(keys), dtype=bool)
    bounds = np.asarray(ranges, dtype=np.int64)
    j = np.searchsorted(bounds[:, 0], keys, side="right") - 1
    return (j >= 0) & (keys <= bounds[np.maximum(j, 0), 1])


class _Plan:
    """The record's entries for the groups of one build, and the images they do not cover yet.

    Args:
        records: the groups of each record location, in order of preference.
        groups: per source, its groups.
    """

    def __init__(self, records: list[dict[str, dict]], groups: list[list[VerifyGroup]]) -> None:
        self.entries: dict[str, dict] = {}
        self.todo: list[tuple[int, int, str, str]] = []  # (source, position, group, item)
        self.keyed = {group.name for source_groups in groups for group in source_groups if group.keyed}
        new: set[str] = set()
        for s, source_groups in enumerate(groups):
            for group in source_groups:
                if group.name not in self.entries:
                    self.entries[group.name], is_new = self._entry(records, group)
                    if is_new:
                        new.add(group.name)
                entry = self.entries[group.name]
                if group.keyed:
                    keys = np.fromiter(map(int, group.items), dtype=np.int64, count=len(group.items))
                    pending = np.flatnonzero(~_in_ranges(keys, entry["keys"])).tolist()
                elif group.name in new:
                    pending = range(len(group.items))
                else:
                    pending = []
                self.todo += [(s, group.positions[j], group.name, group.items[j]) for j in pending]

    @staticmethod
    def _entry(records: list[dict[str, dict]], group: VerifyGroup) -> tuple[dict, bool]:
        """A copy of the first recorded entry of ``group`` with its current fingerprint, else a new entry; and
        whether it is new."""
        for record in records:
            entry = record.get(group.name)
            if entry is not None and entry["fingerprint"] == group.fingerprint:
                keys = {"keys": _merge_ranges(entry.get("keys", []))} if group.keyed else {}
                found = {"bad": dict(entry["bad"]), "small": dict(entry["small"])}
                return {"fingerprint": group.fingerprint, **found, **keys}, False
        keys = {"keys": []} if group.keyed else {}
        return {"fingerprint": group.fingerprint, "bad": {}, "small": {}, **keys}, True

    def positions(self, groups: list[list[VerifyGroup]], field: str) -> list[dict[int, str]]:
        """Per source, ``{position: value}`` of the images the entries list under ``field`` (``bad``: the unreadable
        ones with their errors; ``small``: those under :data:`MIN_IMAGE_SIDE` with their sizes)."""
        result: list[dict[int, str]] = []
        for source_groups in groups:
            found: dict[int, str] = {}
            for group in source_groups:
                recorded = self.entries[group.name][field]
                found.update((p, recorded[i]) for i, p in zip(group.items, group.positions) if i in recorded)
            result.append(dict(sorted(found.items())))
        return result


def _verify(sources: Sequence[VerifiableSource], plan: _Plan, progress: bool) -> None:
    """Verify the images the plan lacks and enter the results (bad and small images, verified keys) into its
    entries."""

    def check(job: tuple[int, int, str, str]) -> tuple[str | None, str | None]:
        """(error, None) for an unreadable image, (None, "WxH") for a small one, else (None, None)."""
        try:
            width, height = sources[job[0]].verify(job[1])
        except DECODE_ERRORS as err:
            return f"{type(err).__name__}: {err}", None
        return None, f"{width}x{height}" if min(width, height) < MIN_IMAGE_SIDE else None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        results = list(
            tqdm(
                pool.map(check, plan.todo, chunksize=64),
                total=len(plan.todo),
                desc="verifying images",
                disable=not progress,
                mininterval=2.0,
            )
        )
    checked: dict[str, list[list[int]]] = {}
    for (_, _, name, item), (err, size) in zip(plan.todo, results):
        entry = plan.entries[name]
        if err is not None:
            entry["bad"][item] = err
        if size is not None:
            entry["small"][item] = size
        if name in plan.keyed:
            checked.setdefault(name, []).append([int(item), int(item)])
    for name, ranges in checked.items():
        plan.entries[name]["keys"] = _merge_ranges(plan.entries[name]["keys"] + ranges)


def _save(root: str, locations: list[Path], records: list[dict[str, dict]], entries: dict[str, dict]) -> Path | None:
    """Write the record (with the other groups found in any location) to the first location that can be written."""
    groups: dict[str, dict] = {}
    for record in reversed(records):
        groups.update(record)
    groups.update(entries)
    text = json.dumps({"version": RECORD_VERSION, "root": root, "groups": groups}, separators=(",", ":"))
    for path in locations:
        try:
            atomic_write_text(path, text)
            return path
        except OSError as err:
            logger.debug("cannot write the verification record to %s: %s", path, err)
    return None


def _warn_small(root: Path, sources: Sequence[VerifiableSource], small: list[dict[int, str]]) -> None:
    """One warning naming how many images are under :data:`MIN_IMAGE_SIDE` and the first five."""
    named = [f"{sources[s].describe(p)} ({size})" for s, found in enumerate(small) for p, size in found.items()]
    if named:
        shown = ", ".join(named[:5]) + (f", ... ({len(named)} in all)" if len(named) > 5 else "")
        logger.warning(
            "%d image(s) of %s are smaller than %d px on a side: %s; they are upscaled to the input size and show "
            "almost nothing of a face: check or remove them",
            len(named),
            root,
            MIN_IMAGE_SIDE,
            shown,
        )


def _verify_and_record(root: Path, sources: Sequence[VerifiableSource], progress: bool) -> list[dict[int, str]]:
    real, locations = os.path.realpath(root), record_locations(root)
    groups = [source.verify_groups(root) for source in sources]
    records = [_read_record(path, real) for path in locations]
    plan = _Plan(records, groups)
    total = sum(len(g.items) for source_groups in groups for g in source_groups)
    if not plan.todo:
        logger.info("all %d images of %s are recorded as verified; skipping verification", total, root)
        _warn_small(root, sources, plan.positions(groups, "small"))
        return plan.positions(groups, "bad")
    logger.info(
        "verifying %d of the %d images of %s (%d recorded as verified before)",
        len(plan.todo),
        total,
        root,
        total - len(plan.todo),
    )
    _verify(sources, plan, progress)
    written = _save(real, locations, records, plan.entries)
    if written is not None:
        logger.info("recorded the image verification of %s in %s", root, written)
    else:
        others = "; the other ranks verify again themselves" if get_world_size() > 1 else ""
        logger.warning(
            "cannot write the image verification record of %s to %s; the next run verifies again%s",
            root,
            " or ".join(map(str, locations)),
            others,
        )
    _warn_small(root, sources, plan.positions(groups, "small"))
    return plan.positions(groups, "bad")


def _read_recorded(root: Path, sources: Sequence[VerifiableSource]) -> list[dict[int, str]]:
    real, locations = os.path.realpath(root), record_locations(root)
    groups = [source.verify_groups(root) for source in sources]
    plan = _Plan([_read_record(path, real) for path in locations], groups)
    if plan.todo:
        s, p, _, _ = plan.todo[0]
        logger.warning(
            "rank %d: the image verification record of %s (written by rank 0 to %s) does not cover %d image(s), "
            "e.g. %s: verifying them on this rank (node-local data or cache?)",
            get_rank(),
            root,
            " or ".join(map(str, locations)),
            len(plan.todo),
            sources[s].describe(p),
        )
        _verify(sources, plan, progress=False)
    return plan.positions(groups, "bad")


def find_corrupt(
    root: str | os.PathLike, sources: Sequence[VerifiableSource], *, progress: bool
) -> list[dict[int, str]]:
    """The unreadable images of ``sources``, verifying only what the record of ``root`` does not cover; images under
    :data:`MIN_IMAGE_SIDE` are named in one warning (on the primary rank).

    A collective under torch.distributed: the primary rank verifies and writes the record, the other ranks wait at a
    barrier and then read it. A rank that cannot read a record covering its images (node-local data or cache on
    another node) verifies them itself, so the result never depends on where the record could be written.

    Args:
        root: the benchmark root (where the record is kept, and what group names are relative to).
        sources: the image sources to check (e.g. the train and test listings).
        progress: show a tqdm bar while verifying.

    Returns:
        Per source, ``{listing position: error}`` of the unreadable images, ascending.

    """
    root = Path(root)
    if not is_primary():
        barrier()
        return _read_recorded(root, sources)
    try:
        return _verify_and_record(root, sources, progress)
    finally:
        barrier()
