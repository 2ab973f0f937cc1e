"""Real recognition runs of train.py (--method recognition) on the tiny SynthFaces preset, through the shared loop."""

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY_MODEL_ARGS, kill_when_written, load_state, log_records, tiny_facegcd_args
from data_loader.protocol_writers import write_synthface_ijb, write_synthface_pair_set


def _recognition_args(data: str, out: Path, experiment: str, *extra: str) -> list[str]:
    """IResNet-18 at 32 px with ArcFace on D_L of the tiny preset (12 labelled images of 4 identities)."""
    return [
        "--method",
        "recognition",
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        data,
        "--arch",
        "iresnet18",
        "--input-size",
        "3",
        "32",
        "32",
        "--embedding-size",
        "64",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--seed",
        "3",
        "--opt",
        "sgd",
        "--lr",
        "0.1",
        "--weight-decay",
        "5e-4",
        "--warmup-epochs",
        "0",
        "--val-interval",
        "1",
        "--val-kmeans-init",
        "2",
        "--output",
        str(out),
        "--experiment",
        experiment,
        "--no-progress",
        *extra,
    ]


# Chance levels of the held-out sets below, for features that carry no identity (1000+ draws of uniform random
# scores through the same metrics): pair-set 10-fold accuracy on 200 pairs 0.50 (99.9th percentile 0.625); IJB AUC
# with 16 genuine of 496 template pairs 0.50 (99.9th percentile 0.717); v2 clustering accuracy of uniform random
# labels on D_U (36 images: 4 old identities x 3, 4 new x 6; K = 8) 0.35 (99th percentile 0.44). Measured on the
# development CPU (seed 3, last epoch): 0.765, 0.784 and 0.583; seeds 4 and 5 gave 0.585-0.70, 0.78-0.82, 0.50-0.58.
PAIR_ACCURACY_BOUND = 0.65
IJB_AUC_BOUND = 0.72
SSK_V2_BOUND = 0.45


def test_recognition_training_lowers_the_loss_and_feeds_verification_extraction_and_ssk(
    tiny_faces, tmp_path, run_script
):
    # held-out identities (ids from 1,000,000 on) as an insightface pair set and an IJB-style folder
    write_synthface_pair_set(tmp_path / "synth.bin", identities=12, pairs=200, progress=False)
    write_synthface_ijb(tmp_path / "ijb", "ijbb", identities=16, progress=False)
    targets = ["--val-targets", str(tmp_path / "synth.bin"), str(tmp_path / "ijb")]
    # ArcFace at s = 16 and lr 0.02: the loss falls within the 6 steps (at s = 64 and lr 0.1 it need not)
    recipe = ["--epochs", "2", "--lr", "0.02", "--head-args", "s=16"]
    run_script("train.py", _recognition_args(tiny_faces, tmp_path, "arc", *recipe, *targets))
    run = tmp_path / "arc"
    records = log_records(run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert "unlabelled" in records[1]["eval"] and "test" in records[1]["eval"]  # clustering validation of D_U, test
    verification = records[1]["eval"]["verification"]
    assert verification["synth"]["accuracy"] > PAIR_ACCURACY_BOUND
    assert verification["ijbb"]["auc"] > IJB_AUC_BOUND
    assert (run / "verification" / "ijbb_roc.png").is_file() and (run / "verification" / "ijbb_tar_at_far.md").is_file()
    best = max(r["eval"]["verification"]["synth"]["accuracy"] for r in records)
    assert load_state(run / "model_best.pth.tar")["metric"] == best  # model_best is selected on the first target

    # verify.py on its own scores the last checkpoint as the last validation did
    verify_out = tmp_path / "verify"
    run_script(
        "verify.py",
        ["--checkpoint_weights", str(run / "last.pth.tar"), "--targets", *targets[1:], "--output", str(verify_out)],
    )
    alone = json.loads((verify_out / "results.json").read_text())["results"]
    assert alone["synth"] == pytest.approx(verification["synth"]) and alone["ijbb"] == pytest.approx(
        verification["ijbb"]
    )
    ckpt = load_state(run / "last.pth.tar")
    assert ckpt["method"] == "recognition" and ckpt["model_config"]["head"] == "arcface"
    assert ckpt["model_config"]["num_classes"] == 4  # the known identities of D_L
    assert ckpt["state_dict"]["partial_fc.weight"].shape == (4, 64)
    assert ckpt["data_config"]["train_set"] == "labelled" and ckpt["data_config"]["num_labelled"] == 12

    # the ArcFace GFD baseline: extraction reads the benchmark settings from the checkpoint, then SSK as usual
    feats = tmp_path / "feats"
    run_script(
        "extract_features.py",
        ["--checkpoint_weights", str(run / "last.pth.tar"), "--save_dir", str(feats), "--experiment", "arc"],
    )
    train = torch.load(feats / "arc" / "features_train.pt", weights_only=True)
    assert train["features"].shape == (48, 64)
    torch.testing.assert_close(train["features"].norm(dim=1), torch.ones(48))
    assert train["meta"]["model_config"]["arch"] == "iresnet18"
    run_script("SSK.py", ["--save_dir", str(feats), "--experiment_idx", "arc", "--k_means_init", "2"])
    results = json.loads(next((feats / "arc").rglob("ssk_results.json")).read_text())
    assert results["M"] == 4 and results["train"]["num_samples"] == 36  # clustered D_U with the 4 labelled classes
    assert results["train"]["v2"]["all"] > SSK_V2_BOUND


def test_recognition_resumes_exactly_after_a_kill(tiny_faces, tmp_path, run_script):
    epochs = ["--epochs", "3"]
    run_script("train.py", _recognition_args(tiny_faces, tmp_path, "full", *epochs))
    args = _recognition_args(tiny_faces, tmp_path, "cut", *epochs)
    last = tmp_path / "cut" / "last.pth.tar"
    kill_when_written("train.py", args, last)
    assert load_state(last)["epoch"] < 2, "the run finished before it could be interrupted"
    run_script("train.py", args + ["--resume", str(last)])
    full, resumed = load_state(tmp_path / "full" / "last.pth.tar"), load_state(last)
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key in full["state_dict"]:
        torch.testing.assert_close(resumed["state_dict"][key], full["state_dict"][key], rtol=0, atol=0, msg=key)
    momentum = [s["momentum_buffer"] for s in resumed["optimizer"]["state"].values()]
    assert any(m.shape == (4, 64) for m in momentum)  # the centres' momentum is saved whole


@pytest.mark.slow  # about a minute; tests/model's 2-process Partial FC and recognizer workers cover sharding quickly
@pytest.mark.distributed
def test_two_process_recognition_shards_the_centres_and_resumes_on_one(tiny_faces, tmp_path, run_script):
    args = _recognition_args(tiny_faces, tmp_path, "ddp", "--epochs", "2", "--batch-size", "2")
    run_script("train.py", args, nproc=2)
    ckpt = load_state(tmp_path / "ddp" / "last.pth.tar")
    assert ckpt["state_dict"]["partial_fc.weight"].shape == (4, 64)  # both ranks' blocks, gathered
    # the 2-process checkpoint continues on one process (each rank's block of centres and momentum re-sliced)
    one = _recognition_args(tiny_faces, tmp_path, "ddp", "--epochs", "3", "--batch-size", "2")
    run_script("train.py", one + ["--resume", str(tmp_path / "ddp" / "last.pth.tar")])
    resumed = load_state(tmp_path / "ddp" / "last.pth.tar")
    assert resumed["epoch"] == 2 and [r["epoch"] for r in log_records(tmp_path / "ddp")] == [0, 1, 2]
    centres, before = resumed["state_dict"]["partial_fc.weight"], ckpt["state_dict"]["partial_fc.weight"]
    assert centres.shape == (4, 64) and not torch.equal(centres, before)  # the one process trained all 4 centres on


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sample-rate", "1.5"], "--sample-rate"),
        (["--sample-rate", "0"], "--sample-rate"),
        (["--method", "facegcd"], "argument --arch: invalid choice: 'iresnet18'"),
        (["--head-args", "s"], "argument --head-args: expected NAME=NUMBER"),
        (["--sched", "step", "--decay-milestones", "3", "1"], "--decay-milestones"),
    ],
)
def test_bad_recognition_flags_fail_with_a_clear_message(tiny_faces, tmp_path, run_script, flags, message):
    proc = run_script("train.py", _recognition_args(tiny_faces, tmp_path, "bad", *flags), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_resuming_a_recognition_run_as_facegcd_is_refused(tiny_faces, tmp_path, run_script):
    run_script("train.py", _recognition_args(tiny_faces, tmp_path, "arc", "--epochs", "1"))
    proc = run_script(
        "train.py",
        [
            "--dataset",
            "synthfaces_tiny",
            "--data-path",
            tiny_faces,
            *TINY_MODEL_ARGS,
            "--batch-size",
            "8",
            "--output",
            str(tmp_path),
            "--experiment",
            "arc",
            "--resume",
            str(tmp_path / "arc" / "last.pth.tar"),
        ],
        check=False,
    )
    assert proc.returncode == 2 and "--method recognition run" in proc.stderr, proc.stderr[-2000:]


def test_part_fvit_learns_landmarks_that_facegcd_then_uses(tiny_faces, tmp_path, run_script):
    vit = ["--arch", "vit_tiny", "--patch_size", "16", "--head", "cosface", "--opt", "adamw", "--lr", "3e-4"]
    args = _recognition_args(tiny_faces, tmp_path, "pfvit", "--epochs", "2", "--landmark_cnn", *vit)
    args += ["--landmark-weights", str(tmp_path / "none.pth")]
    run_script("train.py", args)
    run = tmp_path / "pfvit"
    learned = torch.load(run / "landmark_cnn.pth", weights_only=True)  # the reference key format
    assert learned and all("stn" in k or "output" in k for k in learned)
    ckpt = load_state(run / "last.pth.tar")
    assert ckpt["model_config"]["landmark_cnn"] is True
    first = load_state(run / "checkpoint-0.pth.tar")["state_dict"]["front_end.cnn.output.weight"]
    assert not torch.equal(first, learned["output.weight"])  # trained end to end under the recognition loss
    assert all((run / picture).stat().st_size > 1000 for picture in ("landmarks.png", "mosaic.png"))

    # LAFS fine-tuning from those landmarks: each step's loss is CosFace's + 1000 x the regularisation (epoch 0), so
    # the epoch means satisfy loss - 1000 reg = the mean CosFace loss, which lies in [0, log(1 + 3 e^(64 (1 + 1.4)))]
    # = [0, 154.70] (s = 64, m = 0.4, 4 classes: target logit >= 64 (-1 - 0.4), the other three <= 64)
    lafs = _recognition_args(tiny_faces, tmp_path, "lafs", "--epochs", "1", "--landmark_cnn", *vit)
    lafs += ["--landmark-weights", str(run / "landmark_cnn.pth"), "--landmark-regularisation"]
    run_script("train.py", lafs)
    first = log_records(tmp_path / "lafs")[0]
    assert first["train_landmark_reg"] > 0.0
    assert 0.0 <= first["train_loss"] - 1000.0 * first["train_landmark_reg"] <= 154.70

    # FaceGCD with the learned landmark CNN as its frozen front end
    facegcd = tiny_facegcd_args(
        tiny_faces, tmp_path, "facegcd", "--landmark_cnn", "--landmark-weights", str(run / "landmark_cnn.pth")
    )
    run_script("train.py", facegcd)
    front = load_state(tmp_path / "facegcd" / "last.pth.tar")["state_dict"]["front_end.cnn.output.weight"]
    torch.testing.assert_close(front, learned["output.weight"], rtol=0, atol=0)
