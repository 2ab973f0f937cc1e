"""Logging setup, smoothed meters, a progress-reporting loop wrapper and metric files (JSONL, CSV, wandb).

Everything is emitted through :mod:`logging`; non-primary ranks are filtered by level, ``print`` is never replaced.

References: torchvision ``references/classification/utils.py`` (``SmoothedValue``, ``MetricLogger``),
DINOv2 ``dinov2/logging/helpers.py`` (``MetricLogger`` through a logger, ``dump_in_output_file``),
timm ``timm/utils/summary.py`` (``update_summary``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import math
import netrc
import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils.checkpoint import atomic_write_text
from utils.distributed import all_reduce_sum, is_enabled, is_primary

logger = logging.getLogger(__name__)

LOG_FILE_NAME = "log.txt"
_HANDLER_TAG = "_facegcd_handler"  # marks the handlers installed by setup_logging, so a second call replaces them


def setup_logging(
    output_dir: str | os.PathLike | None = None, rank: int = 0, level: int = logging.INFO
) -> logging.Logger:
    """Configure the root logger: timestamped console output, ``output_dir/log.txt`` on rank 0.

    Ranks other than 0 log at WARNING and above only. Calling it again replaces the handlers it installed before
    and leaves other handlers alone.

    Args:
        output_dir: folder for ``log.txt`` (created if needed); None for console only.
        rank: global rank of this process.
        level: level of the primary rank.

    Returns:
        The root logger.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    prefix = "" if rank == 0 else f"[rank{rank}] "
    fmt = f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
    formatter = logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / LOG_FILE_NAME, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return root


def _reduce_device() -> torch.device:
    """Device that collectives of the current backend accept (CUDA for nccl, CPU otherwise)."""
    if is_enabled() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SmoothedValue:
    """Tracks a series of values: a recent window (median, average) and running totals (global average).

    Tensor values stay on their device until the meter is read (any statistic, ``total``, ``str``), so updating never
    waits for the device; the read copies every pending value to the host at once. The statistics equal those of
    the values read one by one with ``float``: the totals are summed on the host in update order.

    Args:
        window_size: number of recent values kept for ``median`` and ``avg``.
        fmt: ``str.format`` template over ``median``, ``avg``, ``global_avg``, ``max`` and ``value``.
    """

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.count = 0
        self._total = 0.0
        self._pending: list[tuple[torch.Tensor | float, int]] = []  # not yet read to the host, in update order
        self.fmt = fmt if fmt is not None else "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float | torch.Tensor, n: int = 1) -> None:
        """Add ``value``, counted ``n`` times in the global average (e.g. a batch mean over ``n`` samples).

        Args:
            value: a number, or a one-element tensor (kept as it is until the meter is read: do not change it in
                place afterwards).
            n: weight of the value in ``total`` and ``global_avg``.

        Raises:
            ValueError: a tensor with more than one element.
            TypeError: neither a number nor a tensor.
        """
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"needs a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.detach().reshape(())
        elif isinstance(value, (int, float)):
            value = float(value)
        else:
            raise TypeError(f"needs a number, got {type(value).__name__}")
        self.count += n
        if isinstance(value, torch.Tensor) or self._pending:
            self._pending.append((value, n))
        else:
            self._add(value, n)

    def _add(self, value: float, n: int) -> None:
        """Fold one host value into the window and the total."""
        self.deque.append(value)
        self._total += value * n

    def _settle(self) -> None:
        """Read the pending tensors to the host (see :func:`_settle_meters`)."""
        _settle_meters([self])

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over all ranks (the window stays local)."""
        totals = torch.tensor([self.count, self.total], dtype=torch.float64, device=_reduce_device())
        all_reduce_sum(totals)
        self.count = int(totals[0].item())
        self._total = float(totals[1].item())

    @property
    def total(self) -> float:
        """Sum of value x n over every update."""
        self._settle()
        return self._total

    @property
    def median(self) -> float:
        """Median of the window (NaN when empty)."""
        self._settle()
        if not self.deque:
            return math.nan
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        """Mean of the window (NaN when empty)."""
        self._settle()
        if not self.deque:
            return math.nan
        return sum(self.deque) / len(self.deque)

    @property
    def global_avg(self) -> float:
        """Total divided by count over every update (NaN before the first)."""
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        """Largest value in the window (NaN when empty)."""
        self._settle()
        return max(self.deque) if self.deque else math.nan

    @property
    def value(self) -> float:
        """Most recent value (NaN when empty)."""
        self._settle()
        return self.deque[-1] if self.deque else math.nan

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


def _settle_meters(meters: Iterable[SmoothedValue]) -> None:
    """Fold the pending values of ``meters`` into their windows and totals, in update order.

    All pending tensors are copied to the host together: one copy per (device, dtype), so one host-device
    synchronisation for the usual float32 scalars of one device.
    """
    meters = [m for m in meters if m._pending]
    tensors = [v for m in meters for v, _ in m._pending if isinstance(v, torch.Tensor)]
    groups: defaultdict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    host = [0.0] * len(tensors)
    for indices in groups.values():
        for i, v in zip(indices, torch.stack([tensors[i] for i in indices]).cpu().tolist()):
            host[i] = float(v)
    values = iter(host)
    for meter in meters:
        pending, meter._pending = meter._pending, []
        for value, n in pending:
            meter._add(next(values) if isinstance(value, torch.Tensor) else value, n)


class MetricLogger:
    """A dict of :class:`SmoothedValue` meters plus :meth:`log_every`, which times and reports a loop.

    Tensor values are read to the host only when the meters are read (a log line, :meth:`synchronize_between_processes`,
    a statistic), all meters together.

    Args:
        delimiter: separator between meters in the string form.
    """

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs: float | torch.Tensor) -> None:
        """Update the named meters; tensors must hold one element and are not read here (no host synchronisation).

        Args:
            n: weight of each value in the global averages.
            **kwargs: meter name -> value.

        Raises:
            ValueError, TypeError: a value that is not a number or a one-element tensor (the message names the meter).
        """
        for name, value in kwargs.items():
            try:
                self.meters[name].update(value, n=n)
            except (ValueError, TypeError) as e:
                raise type(e)(f"meter {name!r} {e}") from None

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__} has no attribute or meter {attr!r}")

    def __str__(self) -> str:
        _settle_meters(self.meters.values())
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        """Sum every meter's count and total over all ranks (same meter names and order on every rank)."""
        _settle_meters(self.meters.values())
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Register a meter with its own window or format (e.g. ``SmoothedValue(1, "{value:.6f}")`` for lr)."""
        self.meters[name] = meter

    def log_every(
        self,
        iterable: Iterable,
        print_freq: int,
        header: str = "",
        logger: logging.Logger | None = None,
        progress: bool = True,
    ) -> Iterator:
        """Yield the items of ``iterable``, logging ETA, meters, data and iteration time every ``print_freq`` steps.

        The primary rank also shows a tqdm bar (when ``progress``); log lines are routed around it. Peak CUDA memory
        is reported when CUDA is available.

        Args:
            iterable: the loader (``len`` is used for the ETA when it has one).
            print_freq: log every this many iterations (and at the last one).
            header: prefix of each line, e.g. ``"Epoch: [3]"``.
            logger: where lines go (this module's logger by default).
            progress: show a tqdm bar on the primary rank.

        Yields:
            The items of ``iterable``.
        """
        log = logger if logger is not None else logging.getLogger(__name__)
        print_freq = max(1, int(print_freq))
        total = len(iterable) if hasattr(iterable, "__len__") else None
        width = len(str(total)) if total is not None else 1
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        show_bar = progress and is_primary()
        bar = tqdm(
            iterable,
            total=total,
            desc=header or None,
            disable=not show_bar,
            dynamic_ncols=True,
            # Few bar refreshes when stderr goes to a file (nohup), so logs do not fill with redraws.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger()]) if show_bar else contextlib.nullcontext()
        start = end = time.time()
        i = 0
        with redirect, bar:
            for obj in bar:
                data_time.update(time.time() - end)
                yield obj
                iter_time.update(time.time() - end)
                if i % print_freq == 0 or (total is not None and i == total - 1):
                    eta = "?" if total is None else _format_seconds(iter_time.global_avg * (total - i - 1))
                    parts = [header, f"[{i:{width}d}/{total if total is not None else '?'}]", f"eta: {eta}", str(self)]
                    parts += [f"time: {iter_time}", f"data: {data_time}"]
                    if torch.cuda.is_available():
                        parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
                    log.info(self.delimiter.join(p for p in parts if p))
                    if show_bar:
                        bar.set_postfix_str(str(self), refresh=False)
                i += 1
                end = time.time()
        elapsed = time.time() - start
        log.info("%s Total time: %s (%.4f s / it)", header, _format_seconds(elapsed), elapsed / max(i, 1))


def _format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _to_plain(value: Any) -> Any:
    """JSON/CSV-friendly form of tensors, NumPy scalars and paths."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot serialise a {type(value).__name__} to a metrics file")


class JsonlWriter:
    """Keeps a metrics file of one JSON object per line (DINOv2's ``dump_in_output_file``).

    Every write replaces the file atomically (temporary file, then rename), so an interrupted run never leaves a
    partial line behind.

    Args:
        path: the ``.jsonl`` file (its folder is created if needed).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        """Append ``record`` as one line (tensors and NumPy scalars become numbers or lists).

        Args:
            record: the values to store.
        """
        line = json.dumps(record, default=_to_plain)
        existing = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        atomic_write_text(self.path, existing + line + "\n")


def truncate_jsonl(path: str | os.PathLike, first_epoch: int) -> int:
    """Atomically drop the records with ``epoch >= first_epoch`` from a JSONL metrics file (e.g. on resume).

    Args:
        path: the ``.jsonl`` file; a missing file is left missing.
        first_epoch: the first epoch whose records are removed.

    Returns:
        How many records were removed.

    Raises:
        ValueError: a line is not a JSON object with an integer ``epoch``.
    """
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for number, line in enumerate(lines, 1) if _jsonl_epoch(line, path, number) < first_epoch]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))
        logger.info("removed %d records of epochs >= %d from %s", len(lines) - len(kept), first_epoch, path)
    return len(lines) - len(kept)


def _jsonl_epoch(line: str, path: Path, number: int) -> int:
    """The integer ``epoch`` of one JSONL record, with an error naming the file and line otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {number} is not valid JSON ({e}); expected one JSON object per line") from e
    epoch = record.get("epoch") if isinstance(record, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise ValueError(f"{path} line {number} has no integer 'epoch' field; expected one record per epoch")
    return epoch


def update_summary(epoch: int, row: dict, filename: str | os.PathLike, write_header: bool = False) -> None:
    """Append one row ``{"epoch": epoch, **row}`` to a summary CSV (timm's ``summary.csv``).

    Columns follow the row's key order. The header is written when the file is new or empty; ``write_header=True``
    starts the file afresh (a new run). When a row brings columns the file does not have yet, they are added after
    the existing ones and earlier rows get empty cells; columns a row lacks stay empty in that row. The file is
    replaced atomically on every call, so an interrupted run never leaves a partial row behind.

    Args:
        epoch: the epoch of the row (first column).
        row: column name -> value (numbers, strings, one-element tensors).
        filename: the CSV file.
        write_header: truncate the file and write a header first.

    Raises:
        ValueError: ``row`` names another epoch, or the existing file is not a summary CSV.
    """
    if "epoch" in row and row["epoch"] != epoch:
        raise ValueError(f"update_summary got epoch={epoch} but the row says epoch={row['epoch']}")
    rowd = {"epoch": epoch} | {k: _csv_value(v) for k, v in row.items() if k != "epoch"}
    path = Path(filename)
    fieldnames, rows = ([], []) if write_header else _read_summary(path)
    new_columns = [k for k in rowd if k not in fieldnames]
    if new_columns and rows:
        logger.info("summary %s gains columns %s", path, new_columns)
    _write_summary(path, fieldnames + new_columns, rows + [rowd])


def truncate_summary(filename: str | os.PathLike, first_epoch: int) -> int:
    """Atomically drop the rows with ``epoch >= first_epoch`` from a summary CSV (e.g. on resume).

    Args:
        filename: the CSV file; a missing file is left missing.
        first_epoch: the first epoch whose rows are removed.

    Returns:
        How many rows were removed.

    Raises:
        ValueError: the file is not a summary CSV (see :func:`update_summary`).
    """
    path = Path(filename)
    fieldnames, rows = _read_summary(path)
    kept = [r for r in rows if int(r["epoch"]) < first_epoch]
    if len(kept) < len(rows):
        _write_summary(path, fieldnames, kept)
        logger.info("removed %d rows of epochs >= %d from %s", len(rows) - len(kept), first_epoch, path)
    return len(rows) - len(kept)


def _read_summary(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a summary CSV (empty for a missing or empty file); each row needs an integer epoch."""
    if not path.exists() or path.stat().st_size == 0:
        return [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fieldnames = list(reader.fieldnames or [])
    if fieldnames[:1] != ["epoch"]:
        raise ValueError(f"{path} is not a summary CSV: its header {fieldnames} does not start with 'epoch'")
    for number, r in enumerate(rows, 2):
        if None in r or None in r.values() or not r["epoch"].isdigit():
            raise ValueError(
                f"{path} row {number} is malformed; expected {len(fieldnames)} cells starting with an integer epoch"
            )
    return fieldnames, rows


def _write_summary(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    """Atomically replace ``path`` with a header and ``rows`` (missing cells stay empty)."""
    lines = _StringLines()
    writer = csv.DictWriter(lines, fieldnames=fieldnames, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, "".join(lines))


class _StringLines(list):
    """Minimal file-like sink for :class:`csv.writer` that collects the written strings."""

    def write(self, s: str) -> None:
        self.append(s)


def _csv_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return _to_plain(value)


def _wandb_api_key_configured() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``~/.netrc`` has an entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger:
    """Optional Weights & Biases logging that never stops a run.

    With ``WANDB_MODE`` set, wandb follows it; otherwise the run is online when an API key is configured and offline
    (files under ``output_dir/wandb/``) when not. Any wandb error is logged once as a warning and disables logging.
    Create it enabled on the primary rank only.

    Args:
        enabled: False makes every method a no-op.
        project: wandb project name.
        name: run name.
        config: the run's configuration (e.g. ``vars(args)``).
        output_dir: folder for wandb's files.
    """

    def __init__(
        self, enabled: bool, project: str, name: str | None, config: dict | None, output_dir: str | os.PathLike
    ) -> None:
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            logger.warning("--log-wandb was given but wandb is not installed; metrics are not sent to wandb")
            return
        mode = None if os.environ.get("WANDB_MODE") else ("online" if _wandb_api_key_configured() else "offline")
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                name=name,
                config=config,
                dir=str(output_dir),
                mode=mode,
                settings=wandb.Settings(console="off"),
            )
        except Exception as e:  # wandb raises many kinds (network, auth, settings); none may stop training
            logger.warning("wandb could not start (%s: %s); continuing without wandb", type(e).__name__, e)
            return
        logger.info("wandb run %s in %s mode (files in %s)", self.run.name, self.run.settings.mode, self.run.dir)

    @property
    def enabled(self) -> bool:
        """True while a wandb run is active."""
        return self.run is not None

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Send ``metrics`` to wandb (no-op when disabled).

        Args:
            metrics: name -> value.
            step: the x-axis value (e.g. the epoch).
        """
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # see __init__
            logger.warning(
                "wandb logging failed (%s: %s); disabling wandb for the rest of the run", type(e).__name__, e
            )
            self.run = None

    def finish(self) -> None:
        """Close the wandb run (no-op when disabled)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish()
        except Exception as e:  # see __init__
            logger.warning("wandb could not finish cleanly (%s: %s)", type(e).__name__, e)
