"""Helpers for tests that run the scripts (in this process, or as real python / torchrun subprocesses) and load test
worker scripts."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Mapping, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A FaceGCD configuration that trains in seconds on a CPU: ViT-T/16 at 32 px (4 patches + CLS), short prefixes.
TINY_MODEL_ARGS = [
    "--arch",
    "vit_tiny",
    "--patch_size",
    "16",
    "--input-size",
    "3",
    "32",
    "32",
    "--prefix_length",
    "2",
    "--head-out-dim",
    "256",
    "--grad-from-block",
    "0",
    "--workers",
    "0",
    "--seed",
    "1",
]


def tiny_facegcd_args(data: str, out: str | os.PathLike, experiment: str, *extra: str) -> list[str]:
    """``train.py`` flags of a 1-epoch FaceGCD run of :data:`TINY_MODEL_ARGS` on ``synthfaces_tiny`` at ``data``,
    written to ``out/experiment``; ``extra`` flags come last (and win)."""
    return [
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        str(data),
        *TINY_MODEL_ARGS,
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--val-kmeans-init",
        "1",
        "--output",
        str(out),
        "--experiment",
        experiment,
        "--no-progress",
        *extra,
    ]


def log_records(run: str | os.PathLike) -> list[dict]:
    """The per-epoch records of a training run's ``log.jsonl``."""
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def load_state(path: str | os.PathLike) -> dict:
    """A checkpoint as the scripts load it (on the CPU, ``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_worker(path: str | os.PathLike) -> ModuleType:
    """Import a test's worker script (not a package module) by path, to reuse its data builders in the parent test."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A free TCP port on the loopback interface for torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_command(script: str | os.PathLike, args: Sequence[str | os.PathLike], nproc: int = 1) -> list[str]:
    """The command running ``script`` (repository-relative or absolute), with torchrun on a free port if nproc > 1."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return cmd + [os.path.join(ROOT, script), *map(os.fspath, args)]


def script_env() -> dict[str, str]:
    """Environment for script subprocesses: one thread per process, wandb offline and quiet."""
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=ROOT)


def run_in_process(script: str | os.PathLike, args: Sequence[str | os.PathLike]) -> subprocess.CompletedProcess:
    """Run a top-level script's ``cli(argv)`` in this process, as its subprocess would run: its stdout and stderr
    (logs, argparse messages, progress bars) are captured, ``SystemExit`` becomes the exit code, an uncaught exception
    exit code 1 with its traceback on stderr. The log handlers the script installs are removed afterwards."""
    argv = [os.fspath(a) for a in args]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module(Path(script).stem).cli(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
        except Exception:  # noqa: BLE001  (a subprocess would print it and exit 1)
            traceback.print_exc()
            code = 1
        finally:
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)
                handler.close()
            root.setLevel(level)
    return subprocess.CompletedProcess([os.fspath(script), *argv], code, out.getvalue(), err.getvalue())


def run_cli(
    script: str | os.PathLike,
    args: Sequence[str | os.PathLike],
    nproc: int = 1,
    check: bool = True,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    subprocess_run: bool = False,
) -> subprocess.CompletedProcess:
    """Run a script to completion from the repository root.

    One process without ``env`` runs in this process (:func:`run_in_process`), as timm's and the torchvision
    references' tests do, unless ``subprocess_run``; several processes (torchrun), extra environment variables or
    ``subprocess_run`` start a real subprocess in :func:`script_env` updated with ``env``. With ``check``, a non-zero
    exit fails the test with the command and the script's output.
    """
    if nproc == 1 and env is None and not subprocess_run:
        proc = run_in_process(script, args)
    else:
        cmd = script_command(script, args, nproc)
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**script_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def run_torchrun_worker(
    worker: str | os.PathLike,
    args: Sequence[str | os.PathLike],
    nproc: int = 2,
    timeout: float = 110,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a test's worker script in ``nproc`` processes with ``torch.distributed.run`` (one thread each).

    Args:
        worker: the worker script (absolute, or relative to the repository root).
        args: its arguments (paths are converted).
        nproc: number of processes (>= 2).
        timeout: seconds before the run is killed (keep it under the test's own timeout).
        env: extra environment variables.

    Returns:
        The finished process; a non-zero exit has already failed the test with the workers' output.
    """
    if nproc < 2:
        raise ValueError(f"run_torchrun_worker: nproc must be >= 2, got {nproc}")
    return run_cli(worker, args, nproc=nproc, timeout=timeout, env=env)


def kill_when_written(script: str, args: list[str], path, timeout: float = 300.0) -> None:
    """Start ``script`` and SIGKILL it as soon as ``path`` exists (or it exits, or ``timeout`` passes)."""
    proc = subprocess.Popen(
        script_command(script, args),
        cwd=ROOT,
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
