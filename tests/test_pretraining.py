"""Self-supervised pretraining (train.py --method dino / lafs) on tiny SynthFaces, through the shared loop."""

from pathlib import Path

import pytest
import torch
from cli_helpers import kill_when_written, load_state, log_records, tiny_facegcd_args


@pytest.fixture(scope="module")
def landmark_weights(tmp_path_factory) -> str:
    """A landmark CNN for 32 px images with 16 px tiles (4 landmarks), in the reference key format."""
    from model.landmark import LandmarkCNN, save_landmark_weights

    torch.manual_seed(0)
    return str(save_landmark_weights(LandmarkCNN(4), tmp_path_factory.mktemp("landmarks") / "lm.pth"))


def _lafs_args(landmark_weights: str) -> list[str]:
    """LAFS at 32 px: 2 x 2 landmarks, local views keep 1 (a 16 px mosaic); local crops at the global size."""
    return ["--method", "lafs", "--landmark-weights", landmark_weights, "--local-landmarks", "1"]


def _dino_args(data: str, out: Path, experiment: str, *extra: str) -> list[str]:
    """DINO with ViT-T/16 at 32 px, 2 global + 2 local views of 16 px, on all 48 training images (``extra`` may
    switch the method: the last ``--method`` wins)."""
    return [
        "--method",
        "dino",
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        data,
        "--arch",
        "vit_tiny",
        "--patch_size",
        "16",
        "--input-size",
        "3",
        "32",
        "32",
        "--local-crops-number",
        "2",
        "--local-crops-size",
        "16",
        "--head-out-dim",
        "256",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--seed",
        "5",
        "--opt",
        "adamw",
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.04",
        "--warmup-epochs",
        "1",
        "--clip-grad",
        "3.0",
        "--val-interval",
        "1",
        "--val-kmeans-init",
        "1",
        "--output",
        str(out),
        "--experiment",
        experiment,
        "--no-progress",
        *extra,
    ]


def test_dino_pretraining_lowers_the_loss_and_its_checkpoint_starts_facegcd(tiny_faces, tmp_path, run_script):
    run_script("train.py", _dino_args(tiny_faces, tmp_path, "dino", "--epochs", "2"))
    run = tmp_path / "dino"
    records = log_records(run)
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert 0.0 < records[1]["train_teacher_entropy"] <= torch.log(torch.tensor(256.0)).item()
    assert "unlabelled" in records[1]["eval"]  # clustering validation on the teacher's features
    dino = load_state(run / "checkpoint.pth")  # DINO's own format
    assert dino["epoch"] == 1 and {"student", "teacher", "args"} <= set(dino)
    assert any(k.startswith("module.backbone.") for k in dino["student"])
    assert any(k.startswith("backbone.") for k in dino["teacher"]) and any(
        k.startswith("head.") for k in dino["teacher"]
    )

    # FaceGCD starts from it as from the official checkpoint.pth (teacher or student)
    for key in ("teacher", "student"):
        pretrained = ["--pretrained_weights", str(run / "checkpoint.pth"), "--checkpoint_key", key]
        proc = run_script("train.py", tiny_facegcd_args(tiny_faces, tmp_path, f"facegcd_{key}", *pretrained))
        assert f"backbone tensors from {run / 'checkpoint.pth'} (key '{key}')" in proc.stderr
    facegcd = load_state(tmp_path / "facegcd_teacher" / "last.pth.tar")["state_dict"]
    conditioner_copy = facegcd["conditioner.blocks.0.attn.qkv.weight"]  # frozen copy of the pretrained block 0
    torch.testing.assert_close(conditioner_copy, dino["teacher"]["backbone.blocks.0.attn.qkv.weight"])


def test_lafs_pretraining_lowers_the_loss_and_starts_facegcd_with_its_front_end(
    tiny_faces, tmp_path, run_script, landmark_weights
):
    lafs = _lafs_args(landmark_weights) + ["--local-crops-size", "32"]
    run_script("train.py", _dino_args(tiny_faces, tmp_path, "lafs", "--epochs", "2", *lafs))
    run = tmp_path / "lafs"
    records = log_records(run)
    assert records[1]["train_loss"] < records[0]["train_loss"]
    ckpt = load_state(run / "last.pth.tar")
    assert ckpt["method"] == "lafs" and ckpt["model_config"]["landmark_cnn"]
    assert ckpt["model_config"]["local_landmarks"] == 1 and ckpt["model_config"]["landmark_jitter"] == 5.0
    for picture in ("training_curves.png", "landmarks.png", "mosaic.png"):  # loss and teacher entropy; landmarks
        assert (run / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    header = (run / "summary.csv").read_text().splitlines()[0].split(",")
    assert "train_teacher_entropy" in header
    used = load_state(run / "landmark_cnn.pth")  # the frozen CNN, written for FaceGCD's --landmark-weights
    given = load_state(Path(landmark_weights))
    assert used.keys() == given.keys() and all(torch.equal(used[k], given[k]) for k in given)

    landmarks = ["--landmark_cnn", "--landmark-weights", str(run / "landmark_cnn.pth")]
    pretrained = ["--pretrained_weights", str(run / "checkpoint.pth")]
    proc = run_script("train.py", tiny_facegcd_args(tiny_faces, tmp_path, "facegcd", *landmarks, *pretrained))
    assert f"backbone tensors from {run / 'checkpoint.pth'}" in proc.stderr
    facegcd = load_state(tmp_path / "facegcd" / "last.pth.tar")["state_dict"]
    teacher = load_state(run / "checkpoint.pth")["teacher"]
    torch.testing.assert_close(
        facegcd["conditioner.blocks.0.attn.qkv.weight"], teacher["backbone.blocks.0.attn.qkv.weight"]
    )
    front_end = {k.split("cnn.", 1)[1]: v for k, v in facegcd.items() if ".cnn." in k or k.startswith("cnn.")}
    assert front_end.keys() == given.keys() and all(torch.equal(front_end[k], given[k]) for k in given)


@pytest.mark.parametrize("method", ["dino", "lafs"])
def test_pretraining_resumes_exactly_after_a_kill(tiny_faces, tmp_path, run_script, landmark_weights, method):
    epochs = ["--epochs", "3", *(_lafs_args(landmark_weights) if method == "lafs" else [])]
    run_script("train.py", _dino_args(tiny_faces, tmp_path, "full", *epochs))
    args = _dino_args(tiny_faces, tmp_path, "cut", *epochs)
    last = tmp_path / "cut" / "last.pth.tar"
    kill_when_written("train.py", args, last)
    assert load_state(last)["epoch"] < 2, "the run finished before it could be interrupted"
    run_script("train.py", args + ["--resume", str(last)])
    full, resumed = load_state(tmp_path / "full" / "last.pth.tar"), load_state(last)
    for key in full["state_dict"]:  # student, teacher (EMA) and the loss centre
        torch.testing.assert_close(resumed["state_dict"][key], full["state_dict"][key], rtol=0, atol=0, msg=key)
    assert any(k.startswith("dino_loss.center") for k in full["state_dict"])


@pytest.mark.distributed
def test_two_process_dino_pretraining_writes_one_checkpoint(tiny_faces, tmp_path, run_script):
    run_script("train.py", _dino_args(tiny_faces, tmp_path, "ddp", "--epochs", "1", "--batch-size", "4"), nproc=2)
    dino = load_state(tmp_path / "ddp" / "checkpoint.pth")
    student = {k[len("module.") :]: v for k, v in dino["student"].items()}
    assert student.keys() == dino["teacher"].keys()
    ckpt = load_state(tmp_path / "ddp" / "last.pth.tar")
    assert ckpt["method"] == "dino" and ckpt["model_config"]["n_local"] == 2
