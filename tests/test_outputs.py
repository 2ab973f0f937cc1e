"""Nothing lost, nothing mixed: one process per output folder, output sets that are whole or refused, overwrites
that are asked for, resumes that check their settings first, and errors instead of tracebacks."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import ROOT, script_env, tiny_facegcd_args

KILLER = os.path.join(ROOT, "tests", "_kill_at_write.py")


@pytest.fixture(scope="module")
def trained(tiny_faces, tmp_path_factory) -> Path:
    """A finished 1-epoch FaceGCD run of the tiny preset; returns its last.pth.tar."""
    from cli_helpers import run_cli

    out = tmp_path_factory.mktemp("train")
    run_cli("train.py", tiny_facegcd_args(tiny_faces, out, "run", "--checkpoint-select", "last"))
    return out / "run" / "last.pth.tar"


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A real second process that takes the folder's lock and sleeps until killed."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from utils.run_lock import RunLock; "
        "RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, ROOT, str(folder)], stdout=subprocess.PIPE, text=True, env=script_env()
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ one process per folder
def test_a_second_training_into_a_folder_in_use_stops_naming_the_holder(tiny_faces, tmp_path, run_script):
    holder = _hold_lock(tmp_path / "run")
    try:
        proc = run_script("train.py", tiny_facegcd_args(tiny_faces, tmp_path, "run"), check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2
    assert f"run folder {tmp_path / 'run'} is in use by another process (pid {holder.pid}: -c " in proc.stderr
    assert not (tmp_path / "run" / "last.pth.tar").exists() and not (tmp_path / "run" / "log.txt").exists()
    # the kernel released the killed holder's lock: the same command now runs
    run_script("train.py", tiny_facegcd_args(tiny_faces, tmp_path, "run"))
    assert (tmp_path / "run" / "last.pth.tar").is_file()


def test_extraction_ssk_and_verify_refuse_a_folder_in_use(trained, tmp_path, run_script):
    feats = tmp_path / "feats"
    holder = _hold_lock(feats / "x")
    try:
        proc = run_script(
            "extract_features.py",
            ["--checkpoint-weights", str(trained), "--save-dir", str(feats), "--experiment", "x"],
            check=False,
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2 and f"features folder {feats / 'x'} is in use by another process" in proc.stderr


# ------------------------------------------------------------------------------------------ whole sets, overwrites
def _extract(run_script, trained: Path, feats: Path, *extra: str, check: bool = True):
    argv = ["--checkpoint-weights", str(trained), "--save-dir", str(feats), "--experiment", "x", "--workers", "0"]
    return run_script("extract_features.py", [*argv, *extra], check=check)


def _ssk(run_script, feats: Path, *extra: str, check: bool = True):
    argv = ["--save-dir", str(feats), "--experiment-idx", "x", "--kmeans-restarts", "1", "--no-plots", *extra]
    return run_script("SSK.py", argv, check=check)


def test_extraction_refuses_to_overwrite_and_replaces_the_set_and_its_ssk_results_when_asked(
    trained, tmp_path, run_script
):
    feats = tmp_path / "feats"
    _extract(run_script, trained, feats)
    _ssk(run_script, feats)
    before = _digests(feats / "x")
    proc = _extract(run_script, trained, feats, check=False)
    assert proc.returncode == 2
    assert f"{feats / 'x'} already holds features (extraction.json); pass --overwrite" in proc.stderr
    assert _digests(feats / "x") == before

    old_id = json.loads((feats / "x" / "extraction.json").read_text())["output_id"]
    proc = _extract(run_script, trained, feats, "--overwrite")
    manifest = json.loads((feats / "x" / "extraction.json").read_text())
    assert manifest["output_id"] != old_id
    train = torch.load(feats / "x" / "features_train.pt", weights_only=True)
    assert train["meta"]["output_id"] == manifest["output_id"]
    assert not (feats / "x" / "ssk").exists()
    aside = [p for p in (feats / "x").iterdir() if p.name.startswith("ssk.replaced-")]
    assert len(aside) == 1 and (aside[0] / "default" / "ssk_results.json").is_file()  # moved, not deleted
    assert "moved" in proc.stderr and "SSK results of the features being replaced" in proc.stderr


def test_ssk_train_mode_refuses_to_overwrite_results_without_the_flag(trained, tmp_path, run_script):
    feats = tmp_path / "feats"
    _extract(run_script, trained, feats)
    _ssk(run_script, feats)
    results = feats / "x" / "ssk" / "default" / "ssk_results.json"
    first = results.read_bytes()
    proc = _ssk(run_script, feats, check=False)
    assert proc.returncode == 2 and "already holds SSK results (ssk_results.json); pass --overwrite" in proc.stderr
    assert results.read_bytes() == first
    _ssk(run_script, feats, "--overwrite")
    assert json.loads(results.read_text())["output_id"] != json.loads(first)["output_id"]
    _ssk(run_script, feats, "--ssk-mode", "test")  # test mode rewrites the results of the centres it starts from


@pytest.mark.parametrize("killed_after", ["features_train.pt", "features_test.pt"])
def test_a_kill_during_extraction_leaves_features_that_ssk_refuses(killed_after, trained, tmp_path, run_script):
    feats = tmp_path / "feats"
    _extract(run_script, trained, feats)
    argv = ["--checkpoint-weights", str(trained), "--save-dir", str(feats), "--experiment", "x", "--overwrite"]
    argv += ["--workers", "0"]
    proc = subprocess.run(
        [sys.executable, KILLER, killed_after, "extract_features.py", *argv], cwd=ROOT, env=script_env(), timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    refused = _ssk(run_script, feats, check=False)
    assert refused.returncode == 2
    if killed_after == "features_train.pt":  # new train file, previous test file, manifest withdrawn
        assert "features_train.pt have no manifest: the run writing them did not finish" in refused.stderr
    else:
        assert "features_test.pt, features_train.pt have no manifest" in refused.stderr
    assert "extract the features again" in refused.stderr


def test_features_of_two_extractions_are_refused(trained, tmp_path, run_script):
    feats = tmp_path / "feats"
    _extract(run_script, trained, feats)
    other = tmp_path / "other"
    _extract(run_script, trained, other)
    (feats / "x" / "features_test.pt").write_bytes((other / "x" / "features_test.pt").read_bytes())
    refused = _ssk(run_script, feats, check=False)
    assert refused.returncode == 2
    assert "features_test.pt belong to another run than the folder's manifest" in refused.stderr


@pytest.mark.parametrize("killed_after", ["ss_kmeans_cluster_centres.pt", "ssk_predictions.pt"])
def test_a_kill_while_ssk_writes_leaves_centres_that_test_mode_refuses(killed_after, trained, tmp_path, run_script):
    feats = tmp_path / "feats"
    _extract(run_script, trained, feats)
    _ssk(run_script, feats)
    argv = ["--save-dir", str(feats), "--experiment-idx", "x", "--kmeans-restarts", "1", "--no-plots", "--overwrite"]
    proc = subprocess.run([sys.executable, KILLER, killed_after, "SSK.py", *argv], cwd=ROOT, env=script_env())
    assert proc.returncode == -signal.SIGKILL
    refused = _ssk(run_script, feats, "--ssk-mode", "test", check=False)
    assert refused.returncode == 2
    assert "ss_kmeans_cluster_centres.pt have no manifest: the run writing them did not finish" in refused.stderr
    assert "run SSK.py --ssk-mode train (--overwrite) first" in refused.stderr


# ------------------------------------------------------------------------------------------ resume checks
def test_resume_with_another_architecture_names_the_flag_and_writes_nothing(tiny_faces, tmp_path, run_script):
    run_script("train.py", tiny_facegcd_args(tiny_faces, tmp_path, "run", "--epochs", "2", "--val-interval", "5"))
    run = tmp_path / "run"
    before = _digests(run)
    last = run / "last.pth.tar"
    argv = tiny_facegcd_args(tiny_faces, tmp_path, "run", "--epochs", "3", "--resume", str(last))
    changed = [a if a != "vit_tiny" else "vit_small" for a in argv] + ["--prefix-length", "3"]
    proc = run_script("train.py", changed, check=False)
    assert proc.returncode == 2
    assert "--arch vit_small (the run: vit_tiny)" in proc.stderr and "--prefix-length 3 (the run: 2)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _digests(run) == before  # not even a log line


# ------------------------------------------------------------------------------------------ errors, not tracebacks
def test_an_experiment_that_names_a_file_is_an_error(tiny_faces, tmp_path, run_script):
    (tmp_path / "taken").write_text("a user's file\n")
    proc = run_script("train.py", tiny_facegcd_args(tiny_faces, tmp_path, "taken"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'taken'}: a file stands where a folder is needed" in proc.stderr
    assert (tmp_path / "taken").read_text() == "a user's file\n"


def test_file_system_errors_become_one_sentence_about_the_path():
    # root (as here and in CI) may write into read-only folders, so the read-only case is checked on the error itself
    from utils.cli_errors import describe_error

    assert describe_error(PermissionError(errno.EACCES, "Permission denied", "/out/run")) == (
        "/out/run: permission denied; write to a folder you may write (--output, --save-dir or --experiment), or fix "
        "the permissions"
    )
    assert describe_error(OSError(errno.ENOSPC, "No space left on device", "/out/x.pt")) == (
        "/out/x.pt: no space left on the device; free some space or write elsewhere"
    )
    assert describe_error(ValueError("--K 0: need at least one cluster")) == "--K 0: need at least one cluster"


def test_a_symlink_loop_is_an_error(tiny_faces, tmp_path, run_script):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    proc = run_script("train.py", tiny_facegcd_args(tiny_faces, loop, "run"), check=False)
    assert proc.returncode == 2 and "is a loop of symbolic links" in proc.stderr and "Traceback" not in proc.stderr


def test_a_lock_is_released_when_its_holder_ends(tmp_path):
    from utils.run_lock import RunLock, RunLockError

    with RunLock(tmp_path / "f"):
        with pytest.raises(RunLockError, match=f"is in use by another process \\(pid {os.getpid()}: "):
            RunLock(tmp_path / "f").acquire()
    RunLock(tmp_path / "f").acquire().release()  # free again once the holder let go


# ------------------------------------------------------------------------------------------ no silent fallbacks
def test_extracting_a_whole_identity_set_checkpoint_needs_the_benchmark_named(tiny_faces, tmp_path, run_script):
    args = ["--method", "recognition", "--dataset", "recognition_folders", "--data-path", f"{tiny_faces}/train"]
    args += ["--arch", "iresnet18", "--input-size", "3", "32", "32", "--embedding-size", "16", "--batch-size", "8"]
    args += ["--epochs", "1", "--workers", "0", "--output", str(tmp_path), "--experiment", "all", "--no-progress"]
    run_script("train.py", args)
    ckpt = str(tmp_path / "all" / "last.pth.tar")
    proc = run_script("extract_features.py", ["--checkpoint-weights", ckpt, "--save-dir", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "was trained on a whole identity set (recognition_folders at" in proc.stderr
    assert "pass --dataset and --data-path of the benchmark" in proc.stderr
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").glob("features_*.pt"))
    named = ["--dataset", "synthfaces_tiny", "--data-path", tiny_faces, "--workers", "0"]
    run_script("extract_features.py", ["--checkpoint-weights", ckpt, "--save-dir", str(tmp_path), *named])
    meta = torch.load(tmp_path / "features" / "features_train.pt", weights_only=True)["meta"]
    assert meta["dataset"] == "synthfaces_tiny" and meta["data_config"]["input_preset"] == "face"


def test_a_class_folder_that_is_a_symlink_loop_is_an_error(tmp_path, run_script):
    from PIL import Image

    root = tmp_path / "faces"
    for split in ("train", "test"):
        for identity in ("a", "b", "c", "d"):
            (root / split / identity).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (40 * i, 60, 90)).save(root / split / identity / f"{i}.jpg")
    (root / "train" / "e").symlink_to(root / "train" / "e")
    args = ["--dataset", "identity_folders", "--data-path", str(root), "--arch", "vit_tiny", "--patch-size", "16"]
    args += ["--input-size", "3", "32", "32", "--grad-from-block", "0", "--output", str(tmp_path), "--epochs", "1"]
    proc = run_script("train.py", args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is a loop of symbolic links" in proc.stderr, proc.stderr[-2000:]


def test_zero_kmeans_restarts_is_an_error_naming_the_flag(tmp_path, run_script):
    proc = run_script("SSK.py", ["--save-dir", str(tmp_path), "--kmeans-restarts", "0"], check=False)
    assert proc.returncode == 2
    assert "argument --kmeans-restarts: expected an integer >= 1, got '0'" in proc.stderr


def test_verify_scores_an_arcface_torch_backbone_file_on_insightfaces_input(tmp_path, run_script):
    from data_loader.protocol_writers import write_synthface_pair_set
    from model.iresnet import IResNet

    torch.manual_seed(0)
    net = IResNet((2, 2, 2, 2), img_size=32, embedding_size=16).eval()
    torch.save(net.state_dict(), tmp_path / "backbone.pth")  # arcface_torch's format: a bare state dict
    write_synthface_pair_set(tmp_path / "pairs.bin", identities=6, pairs=20, progress=False)
    run_script(
        "verify.py", ["--checkpoint-weights", str(tmp_path / "backbone.pth"), "--targets", str(tmp_path / "pairs.bin")]
    )
    record = json.loads((tmp_path / "verify" / "backbone" / "results.json").read_text())
    assert record["input_preset"] == "face" and record["image_size"] == 32 and set(record["results"]) == {"pairs"}
