"""Real FaceCoresetNet runs of train.py (--method coreset) and verify.py on the tiny SynthFaces preset."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import ROOT, load_state, log_records, script_env
from data_loader.protocol_writers import write_synthface_ijb

KILLER = os.path.join(ROOT, "tests", "_kill_at_write.py")


@pytest.fixture(scope="module")
def recognizer(tiny_faces, tmp_path_factory) -> Path:
    """A 1-epoch AdaFace ViT-T/16 at 32 px (64-d) on D_L of the tiny preset: the frozen recognizer (seconds)."""
    from cli_helpers import run_cli

    out = tmp_path_factory.mktemp("recognizer")
    run_cli(
        "train.py",
        [
            *("--method", "recognition", "--dataset", "synthfaces_tiny", "--data-path", tiny_faces),
            *("--arch", "vit_tiny", "--patch-size", "16", "--input-size", "3", "32", "32", "--embedding-size", "64"),
            *("--head", "adaface", "--batch-size", "4", "--workers", "0", "--seed", "3", "--epochs", "1"),
            *("--val-kmeans-init", "1", "--output", str(out), "--experiment", "rec", "--no-progress"),
        ],
    )
    return out / "rec" / "last.pth.tar"


@pytest.fixture(scope="module")
def ijb(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ijb") / "ijbb"
    write_synthface_ijb(root, "ijbb", identities=16, progress=False)
    return root


def _coreset_args(data: str, recognizer: Path, out: Path, experiment: str, *extra: str) -> list[str]:
    return [
        *("--method", "coreset", "--recognizer", str(recognizer), "--dataset", "synthfaces_tiny"),
        *("--data-path", data, "--batch-size", "4", "--workers", "0", "--seed", "5", "--epochs", "2"),
        *("--output", str(out), "--experiment", experiment, "--no-progress"),
        *extra,
    ]


def test_coreset_training_validates_and_verify_scores_the_aggregator(tiny_faces, recognizer, ijb, tmp_path, run_script):
    extra = ["--cache-augmentations", "3", "--val-targets", str(ijb)]
    run_script("train.py", _coreset_args(tiny_faces, recognizer, tmp_path, "cs", *extra))
    run = tmp_path / "cs"
    records = log_records(run)
    assert [r["epoch"] for r in records] == [0, 1] and "train_gamma" in records[1]
    ckpt = load_state(run / "last.pth.tar")
    assert not any(k.startswith("recognizer.") for k in ckpt["state_dict"])  # the frozen recognizer is not saved
    assert ckpt["state_dict"]["partial_fc.weight"].shape == (4, 64) and "aggregator.gamma" in ckpt["state_dict"]
    stored = ckpt["model_config"]["recognizer"]
    assert (
        stored["path"] == str(recognizer.resolve()) and stored["embedding_size"] == 64 and len(stored["sha256"]) == 64
    )
    assert ckpt["model_config"]["core_size"] == 3 and ckpt["model_config"]["head_args"] == {
        "s": 48,
        "m": 0.8,
        "h": 0.333,
    }
    gammas = [g for g in ckpt["optimizer"]["param_groups"] if g["name"] == "gamma"]
    assert len(gammas) == 1 and gammas[0]["weight_decay"] == 0.0 and len(gammas[0]["params"]) == 1
    # the IJB table holds insightface's modes, mean pooling and the aggregator, which validation reports
    table = json.loads((run / "verification" / "ijbb_results.json").read_text())["tar_at_far"]
    assert set(table) == {"N1D1F1", "N1D0F0", "N0D0F0", "mean", "aggregator"}
    validated = records[1]["eval"]["verification"]["ijbb"]
    assert validated["tar@1e-2"] == table["aggregator"]["1e-2"]

    out = tmp_path / "verify"
    run_script(
        "verify.py",
        ["--checkpoint-weights", str(run / "last.pth.tar"), "--targets", str(ijb), "--output", str(out), "-j", "0"],
    )
    alone = json.loads((out / "results.json").read_text())["results"]["ijbb"]
    assert alone == pytest.approx(validated)


def test_coreset_resumes_exactly_after_a_kill(tiny_faces, recognizer, tmp_path, run_script):
    # images embedded every step (no cache): augmentations, template draws and Gumbel noise all replay
    epochs = ["--epochs", "2"]
    run_script("train.py", _coreset_args(tiny_faces, recognizer, tmp_path, "full", *epochs))
    args = _coreset_args(tiny_faces, recognizer, tmp_path, "cut", *epochs)
    proc = subprocess.run([sys.executable, KILLER, "last.pth.tar", "train.py", *args], cwd=ROOT, env=script_env())
    assert proc.returncode == -signal.SIGKILL
    last = tmp_path / "cut" / "last.pth.tar"
    assert load_state(last)["epoch"] == 0
    run_script("train.py", args + ["--resume", str(last)])
    full, resumed = load_state(tmp_path / "full" / "last.pth.tar"), load_state(last)
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key in full["state_dict"]:
        torch.testing.assert_close(resumed["state_dict"][key], full["state_dict"][key], rtol=0, atol=0, msg=key)
    assert float(full["state_dict"]["aggregator.gamma"]) != 0.01  # gamma trained


@pytest.mark.slow  # about 20 s (torchrun start-up)
@pytest.mark.distributed
def test_two_processes_train_as_one(tiny_faces, recognizer, tmp_path, run_script):
    # attention dropout draws from each rank's generator: switched off, the runs must agree. SGD, whose steps are
    # proportional to the gradients (AdamW's normalised steps turn rounding-level gradient differences into lr-sized
    # ones on near-zero gradient entries)
    common = ["--cache-augmentations", "2", "--coreset-dropout", "0", "--opt", "sgd", "--lr", "0.01"]
    run_script("train.py", _coreset_args(tiny_faces, recognizer, tmp_path, "one", *common))
    two = _coreset_args(tiny_faces, recognizer, tmp_path, "two", *common, "--batch-size", "2")
    run_script("train.py", two, nproc=2)
    one, both = load_state(tmp_path / "one" / "last.pth.tar"), load_state(tmp_path / "two" / "last.pth.tar")
    for key in one["state_dict"]:
        torch.testing.assert_close(both["state_dict"][key], one["state_dict"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["train_loss"] for r in log_records(tmp_path / "two")] == pytest.approx(
        [r["train_loss"] for r in log_records(tmp_path / "one")], rel=1e-5
    )


def _other_file(recognizer: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the recognizer checkpoint with other bytes (and optionally other stored settings)."""
    ckpt = load_state(recognizer)
    ckpt["note"] = "another file"
    ckpt["model_config"].update(changes)
    path = tmp_path / "other.pth.tar"
    torch.save(ckpt, path)
    return path


def test_bad_input_fails_with_one_clear_message(tiny_faces, recognizer, ijb, tmp_path, run_script):
    run_script("train.py", _coreset_args(tiny_faces, recognizer, tmp_path, "cs", "--epochs", "1"))
    last = tmp_path / "cs" / "last.pth.tar"

    # the recognizer must be a recognition checkpoint
    proc = run_script("train.py", _coreset_args(tiny_faces, last, tmp_path, "bad"), check=False)
    assert proc.returncode == 2 and "is not a --method recognition checkpoint" in proc.stderr, proc.stderr[-2000:]

    # resuming with another recognizer file is refused as other data
    other = _other_file(recognizer, tmp_path)
    args = _coreset_args(tiny_faces, other, tmp_path, "cs", "--epochs", "2", "--resume", str(last))
    proc = run_script("train.py", args, check=False)
    assert proc.returncode == 2 and "recognizer_sha256" in proc.stderr, proc.stderr[-2000:]

    # verification refuses a recognizer that is not the recorded one (embedding size, then file contents)
    ckpt = load_state(last)
    ckpt["model_config"]["recognizer"]["embedding_size"] = 128
    torch.save(ckpt, tmp_path / "wrong_size.pth.tar")
    out = ["--output", str(tmp_path / "v"), "-j", "0"]
    proc = run_script(
        "verify.py",
        ["--checkpoint-weights", str(tmp_path / "wrong_size.pth.tar"), "--targets", str(ijb), *out],
        check=False,
    )
    assert proc.returncode == 2 and "embedding_size 64 (recorded: 128)" in proc.stderr, proc.stderr[-2000:]
    ckpt = load_state(last)
    ckpt["model_config"]["recognizer"]["path"] = str(other)
    torch.save(ckpt, tmp_path / "moved.pth.tar")
    proc = run_script(
        "verify.py", ["--checkpoint-weights", str(tmp_path / "moved.pth.tar"), "--targets", str(ijb), *out], check=False
    )
    assert proc.returncode == 2 and "sha256" in proc.stderr and "does not match" in proc.stderr, proc.stderr[-2000:]
    # --recognizer points a checkpoint at its recognizer's new place (the same file), and only such checkpoints
    moved = ["--checkpoint-weights", str(tmp_path / "moved.pth.tar"), "--targets", str(ijb), "-j", "0"]
    moved += ["--output", str(tmp_path / "found")]
    run_script("verify.py", [*moved, "--recognizer", str(recognizer)])
    proc = run_script(
        "verify.py",
        [*moved, "--recognizer", str(recognizer), "--checkpoint-weights", str(recognizer), "--overwrite"],
        check=False,
    )
    assert proc.returncode == 2 and "records no recognizer" in proc.stderr, proc.stderr[-2000:]

    # a template id of the pair list that no face belongs to
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(ijb), str(broken)], check=True)
    pairs = broken / "meta" / "ijbb_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "999 999 0\n")
    proc = run_script("verify.py", ["--checkpoint-weights", str(last), "--targets", str(broken), *out], check=False)
    assert proc.returncode == 2 and "template 999 has no face" in proc.stderr, proc.stderr[-2000:]
