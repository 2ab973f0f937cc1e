"""Checkpoint files: atomic writes, safe loading, a top-k saver and RNG state capture.

Checkpoints hold tensors and plain Python types only, so they load with ``torch.load(weights_only=True)``.
Only the primary rank should call the writing functions; nothing here talks to other ranks.

References: timm ``timm/utils/checkpoint_saver.py`` (``last``, top-k ``checkpoint-N``, ``model_best``),
torchvision ``references/classification/train.py`` (one resumable checkpoint dict).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_EXT = ".pth.tar"
BEST_NAME = "model_best"


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write`` into a temporary file next to ``path``, fsync it, then rename it over ``path``.

    On any failure the temporary file is removed and an existing ``path`` is left untouched. The file gets the
    permissions a plain ``open`` would give it (0666 less the umask), not ``mkstemp``'s owner-only 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file behind.

    Args:
        obj: the object to save (tensors and plain types, to stay loadable with ``weights_only=True``).
        path: destination file; its folder is created if needed.

    Returns:
        The destination path.
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (temporary file, fsync, rename).

    Args:
        path: destination file; its folder is created if needed.
        text: the file's full content.

    Returns:
        The destination path.
    """
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, refused by ``weights_only=True`` loading, or does not fit the model."""


# Classes allowed on top of torch's weights-only defaults: DINO and the reference store ``args`` as a Namespace.
SAFE_GLOBALS = (argparse.Namespace,)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    weights_only: bool = True,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> dict:
    """Read a checkpoint file: the one reader for every checkpoint the scripts load.

    Handles our training checkpoints, reference ``model_best.pth.tar`` files, DINO training ``checkpoint.pth``
    files (``student``/``teacher``/``optimizer``/``args``/...) and backbone-only state dicts such as
    ``dino_vitbase8_pretrain.pth``. ``argparse.Namespace`` is allow-listed, so files that store ``args`` as a
    Namespace load with ``weights_only=True``.

    Args:
        path: checkpoint file.
        weights_only: restrict unpickling to tensors, plain types and ``SAFE_GLOBALS``; False (``--unsafe-load``)
            runs arbitrary pickled code, so use it only for files you trust.
        map_location: where tensors are loaded (CPU by default).
        mmap: map the tensors from the file instead of reading them (cheap look-ups of the metadata; zip-format
            files, i.e. anything saved by torch >= 1.6).

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        CheckpointError: the file is unreadable, corrupt, holds objects not allowed with ``weights_only=True`` (the
            message names them and ``--unsafe-load``), or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable: check the file's permissions")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(e)
        if "Unsupported global" in detail:
            refused = _refused_globals(path, detail)
            raise CheckpointError(
                f"checkpoint {path} holds {', '.join(refused) or detail}, which torch.load(weights_only=True) "
                f"refuses (it allows tensors, plain types and argparse.Namespace). If you trust the file, pass "
                f"--unsafe-load to load it with weights_only=False"
            ) from e
        raise _corrupt_error(path, detail) from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise _corrupt_error(path, f"{type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _refused_globals(path: Path, detail: str) -> list[str]:
    """Names of the pickled globals that weights-only loading refuses: all of them for zip-format files (torch's
    scan), else the first one, taken from torch's error message."""
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_GLOBALS}
    try:
        return [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except (ValueError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile):  # legacy (non-zip) format
        return re.findall(r"Unsupported global: GLOBAL (\S+)", detail)


def _unpickling_detail(error: pickle.UnpicklingError) -> str:
    """The informative line of torch's long weights-only error message (the whole message if there is none)."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", str(error), flags=re.S)
    return f"WeightsUnpickler error: {' '.join(match.group(1).split())}" if match else str(error).strip()


def _corrupt_error(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read checkpoint {path} ({path.stat().st_size} bytes): the file is probably truncated or corrupt "
        f"(an interrupted write or incomplete copy) or not a torch checkpoint. {detail}"
    )


class CheckpointSaver:
    """Keeps ``last``, the best ``max_history`` ``checkpoint-<epoch>`` files and ``model_best`` in one folder.

    Ties keep the earlier epoch as the better one. The bookkeeping (file names relative to ``output_dir``, metrics,
    epochs) is returned by :meth:`state_dict`; store it in the checkpoint and give it back to
    :meth:`load_state_dict` on resume so that the history and the best entry survive a restart. For "select the
    last epoch" pass the epoch as the metric with ``decreasing=False``.

    Args:
        output_dir: folder holding the files (created if needed).
        max_history: how many ``checkpoint-<epoch>`` files to keep (at least 1).
        decreasing: True when a lower metric is better.
        checkpoint_prefix: file name prefix of the per-epoch files.
        recovery_name: file name (without extension) of the every-epoch resume file.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        max_history: int = 10,
        decreasing: bool = False,
        checkpoint_prefix: str = "checkpoint",
        recovery_name: str = "last",
    ) -> None:
        if max_history < 1:
            raise ValueError(f"max_history (--checkpoint-hist) must be at least 1, got {max_history}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.max_history = max_history
        self.decreasing = decreasing
        self.checkpoint_prefix = checkpoint_prefix
        self.recovery_name = recovery_name
        self.checkpoints: list[tuple[str, float, int]] = []  # (file name, metric, epoch), best first
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    @property
    def last_path(self) -> Path:
        """Path of the every-epoch resume file (``last.pth.tar``)."""
        return self.output_dir / f"{self.recovery_name}{CHECKPOINT_EXT}"

    @property
    def best_path(self) -> Path:
        """Path of the copy of the best checkpoint (``model_best.pth.tar``)."""
        return self.output_dir / f"{BEST_NAME}{CHECKPOINT_EXT}"

    def _is_better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def save_last(self, state: dict) -> Path:
        """Atomically write ``state`` to ``last.pth.tar``.

        Args:
            state: the checkpoint dict.

        Returns:
            The written path.
        """
        return atomic_save(state, self.last_path)

    def save_checkpoint(self, state: dict, epoch: int, metric: float) -> tuple[float | None, int | None]:
        """Write ``checkpoint-<epoch>.pth.tar`` if it ranks among the best ``max_history``; update ``model_best``.

        Args:
            state: the checkpoint dict.
            epoch: the (0-based) epoch the state belongs to.
            metric: the selection metric of that epoch.

        Returns:
            ``(best_metric, best_epoch)`` after this call.
        """
        metric = float(metric)
        if metric != metric:
            raise ValueError(f"checkpoint metric for epoch {epoch} is NaN; cannot rank it against earlier epochs")
        self.checkpoints = [c for c in self.checkpoints if c[2] != epoch]  # saving an epoch again replaces it
        if len(self.checkpoints) >= self.max_history and not self._is_better(metric, self.checkpoints[-1][1]):
            logger.info("epoch %d (metric %.6g) is not among the best %d checkpoints", epoch, metric, self.max_history)
            return self.best_metric, self.best_epoch
        name = f"{self.checkpoint_prefix}-{epoch}{CHECKPOINT_EXT}"
        atomic_save(state, self.output_dir / name)
        self.checkpoints.append((name, metric, epoch))
        # Stable sort: among equal metrics the earlier entry stays first.
        self.checkpoints.sort(key=lambda c: c[1], reverse=not self.decreasing)
        for old_name, _, _ in self.checkpoints[self.max_history :]:
            logger.debug("removing checkpoint %s", old_name)
            (self.output_dir / old_name).unlink(missing_ok=True)
        self.checkpoints = self.checkpoints[: self.max_history]
        best_name, best_metric, best_epoch = self.checkpoints[0]
        if best_epoch != self.best_epoch or best_metric != self.best_metric or not self.best_path.exists():
            self._publish_best(self.output_dir / best_name)
        self.best_metric, self.best_epoch = best_metric, best_epoch
        return self.best_metric, self.best_epoch

    def _publish_best(self, src: Path) -> None:
        """Atomically replace ``model_best`` with ``src`` (hard link, or a copy where links are not supported)."""
        tmp = self.best_path.with_name(f".{self.best_path.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, self.best_path)

    def state_dict(self) -> dict:
        """Bookkeeping in plain types (store it in the checkpoint dict)."""
        return {
            "checkpoints": [list(c) for c in self.checkpoints],
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "decreasing": self.decreasing,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the bookkeeping of a previous run; entries whose file has disappeared are dropped with a warning.

        Args:
            state: a dict from :meth:`state_dict`.
        """
        if bool(state["decreasing"]) != self.decreasing:
            raise ValueError(
                f"the checkpoint history was ranked with decreasing={state['decreasing']} but this saver uses "
                f"decreasing={self.decreasing}; the selection metric's direction cannot change on resume"
            )
        entries = []
        for name, metric, epoch in state["checkpoints"]:
            if (self.output_dir / name).is_file():
                entries.append((str(name), float(metric), int(epoch)))
            else:
                logger.warning("checkpoint %s from the saved history is missing; dropping it", self.output_dir / name)
        entries.sort(key=lambda c: c[1], reverse=not self.decreasing)
        for old_name, _, _ in entries[self.max_history :]:
            (self.output_dir / old_name).unlink(missing_ok=True)
        self.checkpoints = entries[: self.max_history]
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]


def capture_rng_state() -> dict:
    """Snapshot of the Python, NumPy, torch CPU and CUDA random generators in weights_only-loadable types.

    Returns:
        A dict with keys ``python``, ``numpy``, ``torch`` and (only with CUDA) ``cuda``.
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore generators captured by :func:`capture_rng_state`.

    Args:
        state: the dict from :func:`capture_rng_state` (possibly after a save/load round trip).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = np.asarray(torch.as_tensor(npst["keys"]).numpy(), dtype=np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda")
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        logger.warning("the checkpoint holds CUDA RNG states but CUDA is not available; they are not restored")
        return
    if len(cuda_states) != torch.cuda.device_count():
        logger.warning(
            "the checkpoint holds %d CUDA RNG states but %d devices are visible; restoring the first %d",
            len(cuda_states),
            torch.cuda.device_count(),
            min(len(cuda_states), torch.cuda.device_count()),
        )
    for device, cuda_state in zip(range(torch.cuda.device_count()), cuda_states):
        torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)
