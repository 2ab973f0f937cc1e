"""Real training runs of train.py on the tiny SynthFaces preset (ViT-T/16 at 32 px, CPU)."""

import csv
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY_MODEL_ARGS, kill_when_written


def _train_args(data: str, out: Path, experiment: str, *extra: str) -> list[str]:
    return [
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        data,
        *TINY_MODEL_ARGS,
        "--batch-size",
        "8",
        "--warmup-epochs",
        "0",
        "--opt",
        "adamw",
        "--lr",
        "3e-4",
        "--weight-decay",
        "0.05",
        "--val-interval",
        "2",
        "--val-kmeans-init",
        "2",
        "--output",
        str(out),
        "--experiment",
        experiment,
        "--no-progress",
        *extra,
    ]


def _epochs(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.distributed
def test_two_process_training_lowers_the_loss(tiny_faces, tmp_path, run_script):
    run_script("train.py", _train_args(tiny_faces, tmp_path, "ddp", "--epochs", "6", "--log-wandb"), nproc=2)
    out = tmp_path / "ddp"
    records = _epochs(out / "log.jsonl")
    assert [r["epoch"] for r in records] == list(range(6))
    first, last = records[0]["train_loss"], (records[-1]["train_loss"] + records[-2]["train_loss"]) / 2
    assert last < first - 0.1, f"loss did not fall: {first:.4f} -> {last:.4f}"
    # one global epoch over both ranks: 48 draws / 2 ranks / batch 8 = 3 steps, logged as throughput per epoch
    for name in ("args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar", "training_curves.png"):
        assert (out / name).is_file(), name
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc,lr")
    rows = list(csv.DictReader(summary))
    assert [int(r["epoch"]) for r in rows] == list(range(6))  # every epoch's loss, for the training curve
    assert [r["eval_all_acc"] != "" for r in rows] == [False, True] * 3  # validations after epochs 1, 3, 5
    assert all(float(r["train_loss"]) > 0 for r in rows)
    ckpt = torch.load(out / "last.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 5 and ckpt["model_config"]["arch"] == "vit_tiny"
    assert any(k.startswith("backbone.prefix_generator.") for k in ckpt["state_dict"])


def test_resume_after_interruption_matches_uninterrupted_run(tiny_faces, tmp_path, run_script):
    epochs = ["--epochs", "4"]
    run_script("train.py", _train_args(tiny_faces, tmp_path, "full", *epochs))

    # the same run, killed as soon as its first epoch is on disk, then resumed from last.pth.tar
    args = _train_args(tiny_faces, tmp_path, "cut", *epochs)
    last = tmp_path / "cut" / "last.pth.tar"
    kill_when_written("train.py", args, last)
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert stopped_at < 3, "the run finished before it could be interrupted"
    run_script("train.py", args + ["--resume", str(last)])

    full, resumed = _weights(tmp_path / "full" / "last.pth.tar"), _weights(last)
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)
    assert [r["epoch"] for r in _epochs(tmp_path / "cut" / "log.jsonl")][-1] == 3


class _KillBefore:
    """``os.replace`` that stops the run (SystemExit) instead of committing ``folder/name``.

    Checkpoints, summary.csv and log.jsonl reach the run folder by a rename, so this kills the run exactly between
    two of those writes; with ``after=True`` the run dies right after that commit instead.
    """

    def __init__(self, folder: Path, name: str, after: bool = False) -> None:
        self.folder, self.name, self.after = folder, name, after
        self.replace = os.replace

    def __call__(self, src, dst, *args, **kwargs) -> None:
        hit = Path(dst) == self.folder / self.name
        if hit and not self.after:
            raise SystemExit(f"killed before writing {self.name}")
        self.replace(src, dst, *args, **kwargs)
        if hit:
            raise SystemExit(f"killed after writing {self.name}")


def _train_in_process(argv: list[str]) -> int:
    """train.py's command line in this process; the log handlers it installs are removed afterwards."""
    import train

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return train.cli(argv)
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def _summary_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _two_epoch_args(data: str, out: Path) -> list[str]:
    """Two epochs, validation after epoch 1 only (so epoch 1 writes checkpoint-1 and model_best)."""
    return _train_args(data, out, "run", "--epochs", "2", "--val-kmeans-iter", "20")


@pytest.fixture(scope="module")
def first_epoch_done(tiny_faces, tmp_path_factory) -> Path:
    """The run folder of a 2-epoch run killed as soon as epoch 0's last.pth.tar is on disk."""
    out = tmp_path_factory.mktemp("killed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", _KillBefore(out / "run", "last.pth.tar", after=True))
        with pytest.raises(SystemExit, match="after writing last.pth.tar"):
            _train_in_process(_two_epoch_args(tiny_faces, out))
    return out / "run"


@pytest.mark.parametrize(
    "name, after",
    [
        ("checkpoint-1.pth.tar", False),
        ("model_best.pth.tar", False),
        ("summary.csv", False),
        ("log.jsonl", False),
        ("last.pth.tar", False),
        ("last.pth.tar", True),
    ],
)
def test_resume_after_a_kill_between_end_of_epoch_writes_keeps_one_row_per_epoch(
    first_epoch_done, tiny_faces, tmp_path, monkeypatch, name, after
):
    run = tmp_path / "run"
    shutil.copytree(first_epoch_done, run)
    argv = _two_epoch_args(tiny_faces, tmp_path) + ["--resume", str(run / "last.pth.tar")]
    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", _KillBefore(run, name, after))
        with pytest.raises(SystemExit, match=f"{'after' if after else 'before'} writing {name}"):
            _train_in_process(argv)  # epoch 1 is trained, then the run dies among its end-of-epoch writes

    assert _train_in_process(argv) == 0
    assert torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)["epoch"] == 1
    rows = _summary_rows(run / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert [r["eval_all_acc"] != "" for r in rows] == [False, True]
    assert [r["epoch"] for r in _epochs(run / "log.jsonl")] == [0, 1]


def test_a_fresh_run_never_overwrites_a_finished_one(tiny_faces, tmp_path, run_script):
    run_script("train.py", _train_args(tiny_faces, tmp_path, "done", "--epochs", "1"))
    digest = hashlib.sha256((tmp_path / "done" / "last.pth.tar").read_bytes()).hexdigest()
    proc = run_script("train.py", _train_args(tiny_faces, tmp_path, "done", "--epochs", "1"), check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert hashlib.sha256((tmp_path / "done" / "last.pth.tar").read_bytes()).hexdigest() == digest


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_faces, tmp_path, run_script):
    run_script("train.py", _train_args(tiny_faces, tmp_path, "good", "--epochs", "1"))
    # the same run, its last checkpoint's head poisoned with NaN, continued for one more epoch
    shutil.copytree(tmp_path / "good", tmp_path / "nan")
    last = tmp_path / "nan" / "last.pth.tar"
    poisoned = torch.load(last, map_location="cpu", weights_only=True)
    poisoned["state_dict"]["projection_head.mlp.0.weight"].fill_(float("nan"))
    torch.save(poisoned, last)
    digest = hashlib.sha256(last.read_bytes()).hexdigest()

    proc = run_script(
        "train.py", _train_args(tiny_faces, tmp_path, "nan", "--epochs", "2", "--resume", str(last)), check=False
    )
    assert proc.returncode != 0
    assert "non-finite training loss" in proc.stderr and "epoch 1, step 0" in proc.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


def test_resume_from_another_file_or_without_its_state_into_a_run_folder_is_refused(tiny_faces, tmp_path, run_script):
    run_script("train.py", _train_args(tiny_faces, tmp_path, "a", "--epochs", "1"))
    run_script("train.py", _train_args(tiny_faces, tmp_path, "b", "--epochs", "1"))
    digest = hashlib.sha256((tmp_path / "b" / "last.pth.tar").read_bytes()).hexdigest()
    for extra in (
        ["--resume", str(tmp_path / "a" / "last.pth.tar")],
        ["--resume", str(tmp_path / "b" / "last.pth.tar"), "--no-resume-opt"],
    ):
        proc = run_script("train.py", _train_args(tiny_faces, tmp_path, "b", "--epochs", "2", *extra), check=False)
        assert proc.returncode != 0 and "already holds a run" in proc.stderr
    assert hashlib.sha256((tmp_path / "b" / "last.pth.tar").read_bytes()).hexdigest() == digest
    assert len(_summary_rows(tmp_path / "b" / "summary.csv")) == 1


def test_reference_training_command_runs_verbatim(tiny_faces, tmp_path, run_script):
    """The documented reference command (docs/decisions.md; docs/cli.md) with paths pointing at existing things."""
    from model.facegcd import ModelConfig, build_facegcd

    weights = tmp_path / "checkpoint.pth"
    backbone = build_facegcd(ModelConfig(arch="vit_tiny", patch_size=16, img_size=32, prefix_length=0)).backbone
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, weights)
    reference = (
        (
            "--pretrained --return-embed --save-images --pin-mem --layer-embed --experiment gcd_synth_prefix10 --amp "
            "--prefix_tuning --prefix_length 10 --data-path DATA --dataset synthfaces_tiny --amp-impl apex "
            "--pretrained_weights WEIGHTS --log-wandb --patch_size 16 --input-size 3 32 32"
        )
        .replace("DATA", tiny_faces)
        .replace("WEIGHTS", str(weights))
        .split()
    )
    # only what the reference command leaves to defaults is shrunk for the CPU: model width, epochs, batch
    small = [
        "--arch",
        "vit_tiny",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--head-out-dim",
        "256",
        "--val-kmeans-init",
        "1",
        "--output",
        str(tmp_path),
        "--no-progress",
    ]
    proc = run_script("train.py", reference + small)
    assert "--amp-impl apex (not installed)" in proc.stderr or "--amp-impl apex (found)" in proc.stderr
    assert "compatibility flags accepted without effect: --pretrained, --return_embed" in proc.stderr
    out = tmp_path / "gcd_synth_prefix10"
    assert list(out.glob("train-batch-*.jpg"))
    assert torch.load(out / "last.pth.tar", map_location="cpu", weights_only=True)["model_config"]["layer_embed"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "no_such_set"], "no_such_set"),
        (["--amp", "--amp-dtype", "float16"], "--amp-dtype float16"),
        (["--not-contrastive"], "--not-contrastive"),
        (["--pretrained_weights", "/nonexistent/weights.pth"], "/nonexistent/weights.pth"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(tiny_faces, tmp_path, run_script, flags, message):
    proc = run_script("train.py", _train_args(tiny_faces, tmp_path, "bad", "--epochs", "1") + flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize("native, precision", [(False, "fp32"), (True, "autocast bfloat16")])
def test_amp_precision_follows_the_cpu_and_is_stored_with_the_run(tiny_faces, tmp_path, monkeypatch, native, precision):
    """--amp on a CPU: bf16 only where the probe says native; the decision goes to args.yaml and the checkpoint."""
    import yaml

    import trainer.precision

    monkeypatch.setattr(trainer.precision, "cpu_has_native_bf16", lambda: native)
    argv = _train_args(tiny_faces, tmp_path, "amp", "--epochs", "1", "--amp", "--val-kmeans-init", "1")
    assert _train_in_process(argv) == 0
    stored = yaml.safe_load((tmp_path / "amp" / "args.yaml").read_text())["recorded"]
    assert stored["precision"] == precision
    assert ("without native bfloat16" in stored["precision_reason"]) is not native
    ckpt = torch.load(tmp_path / "amp" / "last.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["recorded"]["precision"] == precision
    # args.yaml still works as a config file: the recorded section is not an argument
    from trainer.cli import parse_train_args

    again, _ = parse_train_args(["-c", str(tmp_path / "amp" / "args.yaml")])
    assert again.amp and again.epochs == 1 and not hasattr(again, "recorded")
