"""What the benchmarks share: the --device / --threads / --output flags, run set-up, device-synchronised timing,
the environment record and the JSON results (logged, and written to --output when given).

A benchmark's ``main`` is typically::

    setup(args.threads)
    env = environment(resolve_device(args.device), {"numpy": np.__version__})
    save_results({"args": vars(args), "environment": env, "results": run_benchmark(args)}, args.output, logger)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

T = TypeVar("T")


def add_common_args(
    parser: argparse.ArgumentParser, *, device: bool = True, threads_default: int | None = None, output: bool = True
) -> None:
    """Adds the flags the benchmarks share: ``--device`` (optional), ``--threads`` and ``--output`` (optional).

    Args:
        parser: the benchmark's parser.
        device: add ``--device`` (default None: CUDA when available, see `resolve_device`).
        threads_default: default of ``--threads`` (None: the libraries' own defaults).
        output: add ``--output``, the results JSON file (default None: not written).
    """
    if device:
        parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    shown = "library defaults" if threads_default is None else threads_default
    parser.add_argument("--threads", type=int, default=threads_default, help=f"CPU threads (default: {shown})")
    if output:
        parser.add_argument("--output", default=None, help="also write the JSON results to this file (default: none)")


def setup(threads: int | None, level: int = logging.INFO) -> None:
    """Logs to stderr with timestamps (`LOG_FORMAT`) and sets torch's intra-op threads when `threads` is given."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_device(name: str | None) -> torch.device:
    """The device named by ``--device``; None means CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def synchronize(device: torch.device) -> None:
    """Waits for the queued work on `device` (a no-op on the CPU), so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device, repeats: int = 1) -> tuple[T, float]:
    """Runs `fn` `repeats` times, synchronising `device` around each run.

    Args:
        fn: the work to time.
        device: the device `fn` queues work on.
        repeats: number of runs (>= 1).

    Returns:
        The output of the last run and the shortest wall time of a run, in seconds.
    """
    if repeats < 1:
        raise ValueError(f"timed: repeats must be >= 1, got {repeats}")
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return out, best


def environment(device: torch.device, versions: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """Python, torch and other library versions, the machine, torch's thread count and the device of this run.

    Args:
        device: the device the benchmark runs on (its CUDA name is recorded, else "cpu").
        versions: versions of the other libraries the benchmark uses, by name (listed after torch's).
        **extra: further entries (thread pools, environment variables, ...), appended last.

    Returns:
        The ``environment`` entry of a results file.
    """
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **(versions or {}),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **extra,
    }


def save_results(
    results: Mapping[str, Any],
    output: str | os.PathLike | None,
    log: logging.Logger | None = None,
    *,
    sort_keys: bool = False,
) -> str:
    """Dumps `results` as indented JSON, logs it with `log` and writes it to `output` (folders created).

    Args:
        results: JSON-serialisable results.
        output: the file to write; None or "" writes nothing.
        log: the benchmark's logger; None logs nothing.
        sort_keys: sort the keys of every JSON object.

    Returns:
        The JSON text (without the trailing newline the file gets).
    """
    text = json.dumps(results, indent=2, sort_keys=sort_keys)
    if log is not None:
        log.info("results:\n%s", text)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        if log is not None:
            log.info("wrote %s", path)
    return text


def cli_main(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], int],
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parses the command line with `parser` and runs `main`.

    Args:
        parser: the benchmark's parser.
        main: the benchmark's ``main(args)``.
        errors: exception types that mean a bad flag value: they exit as a usage error (status 2, the message
            after the usage line) instead of a traceback.

    Returns:
        The exit status of `main`.
    """
    args = parser.parse_args()
    try:
        return main(args)
    except errors as err:
        parser.error(str(err))
