"""Suite-wide settings: one intra-op thread per test process.

The tests use tiny tensors that gain nothing from threading, and on a shared 2-core machine OpenMP threads
spinning against other processes slow every op down many times over. Subprocesses started by tests (torchrun)
inherit OMP_NUM_THREADS=1.
"""

import os

import pytest
import torch

from cli_helpers import run_cli

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


@pytest.fixture(scope="session")
def tiny_faces(tmp_path_factory) -> str:
    """The ``synthfaces_tiny`` preset, generated once per session."""
    from data_loader.synthface import ensure_synthfaces

    root = tmp_path_factory.mktemp("synthfaces") / "tiny"
    ensure_synthfaces(root, "synthfaces_tiny")
    return str(root)


@pytest.fixture
def run_script():
    """``run_script(script, args, nproc=1, check=True, timeout=600)``: a top-level script in a subprocess."""
    return run_cli


@pytest.fixture(scope="session")
def tiny_run(tiny_faces, tmp_path_factory) -> dict:
    """One real 1-epoch training run on the tiny preset with --layer-embed; returns its paths."""
    from cli_helpers import tiny_facegcd_args

    out = tmp_path_factory.mktemp("train")
    run_cli(
        "train.py",
        tiny_facegcd_args(tiny_faces, out, "run", "--layer-embed", "--opt", "adamw", "--lr", "3e-4"),
    )
    return {"data": tiny_faces, "dir": out / "run", "checkpoint": out / "run" / "model_best.pth.tar"}
