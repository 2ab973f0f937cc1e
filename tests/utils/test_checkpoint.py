"""Tests for utils/checkpoint.py: atomic writes, clear load errors, the top-k saver and RNG state round trips."""

from __future__ import annotations

import argparse
import pathlib
import random

import numpy as np
import pytest
import torch

from utils.checkpoint import (
    CheckpointError,
    CheckpointSaver,
    atomic_save,
    atomic_write_text,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("refuses to pickle")


def test_atomic_save_round_trip_and_failure_keeps_old_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth.tar"
    atomic_save({"w": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))

    with pytest.raises(TypeError, match="refuses to pickle"):
        atomic_save({"w": torch.zeros(2), "bad": _Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth.tar"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two é")
    assert path.read_text(encoding="utf-8") == "two é"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_load_missing_and_corrupt_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load_checkpoint(missing)

    good = tmp_path / "good.pth.tar"
    atomic_save({"w": torch.randn(64, 64)}, good)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(RuntimeError, match=r"truncated\.pth\.tar.*truncated or corrupt"):
        load_checkpoint(truncated)

    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match=r"garbage\.pth\.tar.*corrupt"):
        load_checkpoint(garbage)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_weights_only_rejects_foreign_objects_naming_them_and_unsafe_load(tmp_path, zip_format):
    path = tmp_path / "foreign.pth"
    torch.save({"path": pathlib.PurePosixPath("/x")}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"foreign\.pth holds pathlib\.PurePosixPath, .*pass --unsafe-load"):
        load_checkpoint(path)
    assert str(load_checkpoint(path, weights_only=False)["path"]) == "/x"


def test_weights_only_loads_namespace_and_its_vars(tmp_path):
    args = argparse.Namespace(lr=0.1, arch="vit_base", input_size=[3, 112, 112], resume="")
    path = tmp_path / "ns.pth.tar"
    atomic_save({"args": vars(args), "reference_args": args, "state_dict": {"w": torch.ones(2)}}, path)
    loaded = load_checkpoint(path, weights_only=True)
    assert loaded["args"] == vars(args)
    assert isinstance(loaded["reference_args"], argparse.Namespace)
    assert loaded["reference_args"] == args


def test_load_rejects_non_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(1), path)
    with pytest.raises(RuntimeError, match="expected a dict"):
        load_checkpoint(path)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_checkpoint_saver_keeps_top_k_and_best(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=2)
    metrics = {0: 0.3, 1: 0.5, 2: 0.4, 3: 0.2, 4: 0.6}
    results = {}
    for epoch, metric in metrics.items():
        state = {"epoch": epoch, "w": torch.full((2,), float(epoch))}
        saver.save_last(state)
        results[epoch] = saver.save_checkpoint(state, epoch, metric)
    assert results[1] == (0.5, 1) and results[3] == (0.5, 1) and results[4] == (0.6, 4)
    assert _files(tmp_path) == ["checkpoint-1.pth.tar", "checkpoint-4.pth.tar", "last.pth.tar", "model_best.pth.tar"]
    assert load_checkpoint(tmp_path / "model_best.pth.tar")["epoch"] == 4
    assert load_checkpoint(tmp_path / "last.pth.tar")["epoch"] == 4
    assert [c[2] for c in saver.checkpoints] == [4, 1]


def test_checkpoint_saver_decreasing_and_ties_keep_earlier(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=3, decreasing=True)
    for epoch, metric in enumerate([2.0, 1.0, 1.0, 3.0]):
        best = saver.save_checkpoint({"epoch": epoch}, epoch, metric)
    assert best == (1.0, 1)
    assert load_checkpoint(tmp_path / "model_best.pth.tar")["epoch"] == 1
    assert "checkpoint-3.pth.tar" not in _files(tmp_path)


def test_checkpoint_saver_resume_keeps_history(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=2)
    saver.save_checkpoint({"epoch": 0}, 0, 0.7)
    saver.save_checkpoint({"epoch": 1}, 1, 0.1)
    atomic_save({"saver": saver.state_dict()}, tmp_path / "last.pth.tar")

    resumed = CheckpointSaver(tmp_path, max_history=2)
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pth.tar")["saver"])
    assert resumed.save_checkpoint({"epoch": 2}, 2, 0.5) == (0.7, 0)
    assert not (tmp_path / "checkpoint-1.pth.tar").exists()
    assert load_checkpoint(tmp_path / "model_best.pth.tar")["epoch"] == 0

    with pytest.raises(ValueError, match="decreasing"):
        CheckpointSaver(tmp_path, decreasing=True).load_state_dict(resumed.state_dict())


def test_checkpoint_saver_rejects_nan_and_bad_history(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        CheckpointSaver(tmp_path, max_history=0)
    with pytest.raises(ValueError, match="epoch 3 is NaN"):
        CheckpointSaver(tmp_path).save_checkpoint({}, 3, float("nan"))


def _draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    atomic_save({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = _draw() + (np.random.randn(),)

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert _draw() + (np.random.randn(),) == expected


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp makes 0600 files; an atomically written log or checkpoint must follow the umask like open() does."""
    import os
    import stat

    from utils.checkpoint import atomic_save, atomic_write_text

    previous = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        for path in (atomic_write_text(tmp_path / "a.txt", "x"), atomic_save({"w": 1}, tmp_path / "b.pt")):
            assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    finally:
        os.umask(previous)
