"""Real TransFace runs of train.py (--method recognition --arch transface_vit_t --dpap --ehsm) on the tiny SynthFaces
preset, through the shared loop: resume after a kill, verify.py, feature extraction, two processes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import ROOT, load_state, script_env
from data_loader.protocol_writers import write_synthface_ijb, write_synthface_pair_set

KILLER = os.path.join(ROOT, "tests", "_kill_at_write.py")


def _transface_args(data: str, out: Path, experiment: str, *extra: str) -> list[str]:
    """transface_vit_t at 36 px (a 4 x 4 grid of 9 px patches) with DPAP (p = 0.5, 3 patches) and EHSM, ArcFace
    s = 16, on D_L of the tiny preset (12 labelled images of 4 identities), 3 steps of 4 images per epoch; validation
    after the last of 2 epochs only."""
    return [
        "--method",
        "recognition",
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        data,
        "--arch",
        "transface_vit_t",
        "--input-size",
        "3",
        "36",
        "36",
        "--embedding-size",
        "32",
        "--transface-mask-ratio",
        "0.25",
        "--dpap",
        "--dpap-prob",
        "0.5",
        "--dpap-patches",
        "3",
        "--ehsm",
        "--head-args",
        "s=16",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--seed",
        "3",
        "--lr",
        "1e-4",
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


def test_transface_trains_resumes_exactly_after_a_kill_and_verifies_and_extracts(tiny_faces, tmp_path, run_script):
    write_synthface_pair_set(tmp_path / "synth.bin", identities=6, pairs=40, progress=False)
    write_synthface_ijb(tmp_path / "ijb", "ijbb", identities=6, progress=False)
    targets = ["--val-targets", str(tmp_path / "synth.bin"), str(tmp_path / "ijb")]
    epochs = ["--epochs", "2", *targets]
    run_script("train.py", _transface_args(tiny_faces, tmp_path, "full", *epochs))
    args = _transface_args(tiny_faces, tmp_path, "cut", *epochs)
    last = tmp_path / "cut" / "last.pth.tar"
    proc = subprocess.run([sys.executable, KILLER, "last.pth.tar", "train.py", *args], cwd=ROOT, env=script_env())
    assert proc.returncode == -signal.SIGKILL and load_state(last)["epoch"] == 0
    run_script("train.py", args + ["--resume", str(last)])
    full, resumed = load_state(tmp_path / "full" / "last.pth.tar"), load_state(last)
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key in full["state_dict"]:
        torch.testing.assert_close(resumed["state_dict"][key], full["state_dict"][key], rtol=0, atol=0, msg=key)
    state, config = full["state_dict"], full["model_config"]
    assert int(state["dpap.step"]) == 6  # 2 epochs of 3 steps, one DPAP draw each
    assert config["arch"] == "transface_vit_t" and config["patch_size"] == 9 and config["dpap"] and config["ehsm"]
    assert config["weight_decay_on"] == "all" and config["input_preset"] == "face"
    assert state["backbone.senet.0.weight"].shape == (16, 16 * 256)
    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert 1.0 < records[-1]["train_ehsm_weight"] <= 2.0
    assert records[-1]["train_lr"] > 0  # AdamW, weight decay 0.1 on every parameter (one group)
    assert [g["weight_decay"] for g in full["optimizer"]["param_groups"]] == [0.1]
    assert full["args"]["sched"] == "poly" and full["args"]["opt"] == "adamw"  # the TransFace recipe

    # verify.py scores the checkpoint as the last validation did; extraction gives unit-norm 32-d features
    verify_out = tmp_path / "verify"
    run_script(
        "verify.py",
        [
            "--checkpoint_weights",
            str(tmp_path / "full" / "last.pth.tar"),
            "--targets",
            *targets[1:],
            "--output",
            str(verify_out),
        ],
    )
    alone = json.loads((verify_out / "results.json").read_text())["results"]
    assert alone["synth"] == pytest.approx(records[-1]["eval"]["verification"]["synth"])
    feats = tmp_path / "feats"
    run_script(
        "extract_features.py",
        [
            "--checkpoint_weights",
            str(tmp_path / "full" / "last.pth.tar"),
            "--save_dir",
            str(feats),
            "--experiment",
            "tf",
        ],
    )
    train = torch.load(feats / "tf" / "features_train.pt", weights_only=True)
    assert train["features"].shape == (48, 32)
    torch.testing.assert_close(train["features"].norm(dim=1), torch.ones(48))


@pytest.mark.slow  # about 40 s: two processes, then the checkpoint continues on one
@pytest.mark.distributed
def test_two_process_transface_trains_and_resumes_on_one(tiny_faces, tmp_path, run_script):
    args = _transface_args(tiny_faces, tmp_path, "ddp", "--epochs", "1", "--batch-size", "2")
    run_script("train.py", args, nproc=2)
    ckpt = load_state(tmp_path / "ddp" / "last.pth.tar")
    assert ckpt["state_dict"]["partial_fc.weight"].shape == (4, 32) and int(ckpt["state_dict"]["dpap.step"]) == 3
    one = _transface_args(tiny_faces, tmp_path, "ddp", "--epochs", "2", "--batch-size", "2")
    run_script("train.py", one + ["--resume", str(tmp_path / "ddp" / "last.pth.tar")])
    resumed = load_state(tmp_path / "ddp" / "last.pth.tar")
    assert resumed["epoch"] == 1 and int(resumed["state_dict"]["dpap.step"]) == 9  # 3 steps on 2 ranks, then 6


def test_bad_transface_flags_fail_with_a_clear_message(tiny_faces, tmp_path, run_script):
    proc = run_script("train.py", _transface_args(tiny_faces, tmp_path, "bad", "--patch-size", "8"), check=False)
    assert proc.returncode == 2 and "--patch-size 8: TransFace backbones use 9 x 9 patches" in proc.stderr
    iresnet = _transface_args(tiny_faces, tmp_path, "bad2", "--arch", "iresnet18", "--input-size", "3", "32", "32")
    proc = run_script("train.py", iresnet, check=False)
    assert proc.returncode == 2 and "--dpap, --ehsm: TransFace backbones only" in proc.stderr, proc.stderr[-2000:]
