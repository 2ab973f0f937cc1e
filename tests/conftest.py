"""Suite-wide settings: one intra-op thread per test process.

The tests use tiny tensors that gain nothing from threading, and on a shared 2-core machine OpenMP threads
spinning against other processes slow every op down many times over. Subprocesses started by tests (torchrun)
inherit OMP_NUM_THREADS=1.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def single_thread():
    """Run each test on one intra-op thread and restore the previous setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A FaceGCD configuration that trains in seconds on a CPU: ViT-T/16 at 32 px (4 patches + CLS), short prefixes.
TINY_MODEL_ARGS = [
    "--arch", "vit_tiny", "--patch_size", "16", "--input-size", "3", "32", "32", "--prefix_length", "2",
    "--head-out-dim", "256", "--grad-from-block", "0", "--workers", "0", "--seed", "1",
]


@pytest.fixture(scope="session")
def tiny_faces(tmp_path_factory) -> str:
    """The ``synthfaces_tiny`` preset, generated once per session."""
    from data_loader.synthface import ensure_synthfaces

    root = tmp_path_factory.mktemp("synthfaces") / "tiny"
    ensure_synthfaces(root, "synthfaces_tiny")
    return str(root)


@pytest.fixture
def run_script():
    """Run a top-level script (``train.py``, ...) in a subprocess, with torchrun when ``nproc > 1``.

    Returns a callable ``(script, args, nproc=1, check=True, timeout=600) -> CompletedProcess``.
    """
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def run(script: str, args: list[str], nproc: int = 1, check: bool = True, timeout: int = 600):
        cmd = [sys.executable]
        if nproc > 1:
            cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
        cmd += [os.path.join(ROOT, script), *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=ROOT)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return run
