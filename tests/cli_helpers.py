"""Helpers for tests that run the top-level scripts as real subprocesses (plain python or torchrun)."""

import os
import signal
import socket
import subprocess
import sys
import time

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


def free_port() -> int:
    """A free TCP port on the loopback interface for torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_command(script: str, args: list[str], nproc: int = 1) -> list[str]:
    """The command line that runs ``script`` (relative to the repository root), with torchrun when nproc > 1."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return cmd + [os.path.join(ROOT, script), *args]


def script_env() -> dict[str, str]:
    """Environment for script subprocesses: one thread per process, wandb offline and quiet."""
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=ROOT)


def run_cli(script: str, args: list[str], nproc: int = 1, check: bool = True, timeout: int = 600):
    """Run a script to completion; with ``check``, a non-zero exit fails the test with the script's output."""
    cmd = script_command(script, args, nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


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
