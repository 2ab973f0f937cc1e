"""Output sets that appear whole or not at all, and overwrites that are asked for.

A script's outputs (extraction: ``features_train.pt``, ``features_test.pt``, ``extraction.json``; SSK: centres,
predictions, ``ssk_results.json``; verification: tables, curves, ``results.json``) form one set. Every file of a set
carries the same random ``output id``; the set's manifest (the JSON file) is written last, after the others, and
removed first when a set is replaced. A reader accepts a set only when the manifest exists and every file carries its
id, so a kill at any point leaves either the previous complete set, or files that readers refuse with a message saying
to run the script again: never a mix that is read as one.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import datetime
from pathlib import Path

logger = logging.getLogger(__name__)

OUTPUT_ID_KEY = "output_id"


class OutputExistsError(ValueError):
    """The folder holds a complete earlier output set and ``--overwrite`` was not given."""


class IncompleteOutputError(ValueError):
    """The files of an output set do not belong together (an interrupted write, or files from two runs)."""


def new_output_id() -> str:
    """A fresh id for one output set."""
    return uuid.uuid4().hex


def refuse_complete_output(manifest: Path, overwrite: bool, what: str) -> None:
    """Stop unless ``manifest`` (the last file of a complete set) is absent or ``--overwrite`` was given.

    Raises:
        OutputExistsError: the folder holds a complete ``what`` and ``overwrite`` is False.
    """
    if manifest.exists() and not overwrite:
        raise OutputExistsError(
            f"{manifest.parent} already holds {what} ({manifest.name}); pass --overwrite to replace it, or write "
            "elsewhere"
        )


def withdraw_manifest(manifest: Path) -> None:
    """Remove the manifest of a set about to be replaced, so its files are no longer read as a complete set."""
    if manifest.exists():
        os.remove(manifest)
        logger.info("replacing the output set of %s (--overwrite)", manifest.parent)


def move_aside(path: Path, reason: str) -> Path | None:
    """Rename ``path`` (results derived from a replaced set) to ``<name>.replaced-<time>`` beside it; None when it
    does not exist. Nothing is deleted."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.replaced-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
    os.replace(path, target)
    logger.warning("moved %s aside to %s: %s", path, target, reason)
    return target


def check_output_ids(manifest_id: str | None, ids: dict[str, str | None], folder: Path, rerun: str) -> None:
    """Every file of a set must carry its manifest's id.

    Args:
        manifest_id: the manifest's id, or None when there is no manifest.
        ids: file name -> the id it carries (None for files written before ids existed).
        folder: the set's folder, for the message.
        rerun: the command that writes the set again, for the message.

    Raises:
        IncompleteOutputError: a file carries another id, or the files carry ids but the manifest is missing.
    """
    carried = {name: value for name, value in ids.items() if value is not None}
    if not carried:
        return
    if manifest_id is None:
        raise IncompleteOutputError(
            f"{folder}: {', '.join(sorted(carried))} have no manifest: the run writing them did not finish; {rerun}"
        )
    strays = sorted(name for name, value in carried.items() if value != manifest_id)
    if strays:
        raise IncompleteOutputError(
            f"{folder}: {', '.join(strays)} belong to another run than the folder's manifest (an interrupted "
            f"write?); {rerun}"
        )
