"""FaceGCD with the landmark front end (--landmark_cnn) through train.py, extract_features.py and SSK.py."""

import json

import pytest
import torch
from cli_helpers import TINY_MODEL_ARGS, tiny_facegcd_args
from test_extract_features import reference_extraction_args

from model.landmark import LandmarkCNN, save_landmark_weights


@pytest.fixture(scope="module")
def landmark_run(tiny_faces, tmp_path_factory) -> dict:
    """A 1-epoch FaceGCD run with the frozen landmark front end (ViT-T/16 at 32 px: 4 landmarks, 16 px tiles)."""
    from cli_helpers import run_cli

    out = tmp_path_factory.mktemp("landmark")
    torch.manual_seed(0)
    cnn = LandmarkCNN(num_landmarks=4)
    save_landmark_weights(cnn, out / "landmarks.pth")
    landmarks = ["--landmark_cnn", "--landmark-weights", str(out / "landmarks.pth")]
    args = tiny_facegcd_args(tiny_faces, out, "run", *landmarks, "--opt", "adamw", "--lr", "3e-4")
    run_cli("train.py", args)
    return {"data": tiny_faces, "out": out, "cnn": cnn, "checkpoint": out / "run" / "model_best.pth.tar"}


def test_training_keeps_the_landmark_cnn_frozen_and_inside_the_checkpoint(landmark_run):
    ckpt = torch.load(landmark_run["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["model_config"]["landmark_cnn"] is True
    cnn_state = {k[len("front_end.cnn.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("front_end.cnn.")}
    assert cnn_state, "the landmark CNN must travel inside the checkpoint"
    for key, value in landmark_run["cnn"].state_dict().items():  # frozen: exactly the loaded weights after training
        torch.testing.assert_close(cnn_state[key], value, rtol=0, atol=0, msg=key)


def test_reference_extraction_and_ssk_commands_run_verbatim_with_the_front_end(landmark_run, tmp_path, run_script):
    args = reference_extraction_args(landmark_run["data"], tmp_path, landmark_run["checkpoint"])
    run_script("extract_features.py", args + ["--workers", "0"])  # no landmark file: the CNN is in the checkpoint
    features = tmp_path / "gcd_synth_pretrain_prefix10"
    train = torch.load(features / "features_train.pt", weights_only=True)
    assert train["features"].shape == (48, 192) and train["meta"]["model_config"]["landmark_cnn"] is True
    run_script(
        "SSK.py",
        [
            "--save_dir",
            str(tmp_path),
            "--experiment_idx",
            "gcd_synth_pretrain_prefix10",
            "--landmark_cnn",
            "--k_means_init",
            "2",
            "--no-plots",
        ],
    )
    results = json.loads((features / "ssk" / "default" / "ssk_results.json").read_text())
    assert results["K"] == 8 and results["train"]["num_samples"] == 36
    # the reverse mismatch is an error too
    plain = [a for a in args if a != "--landmark_cnn"] + ["--workers", "0", "--experiment", "plain"]
    proc = run_script("extract_features.py", plain, check=False)
    assert proc.returncode == 2 and "has the landmark front end (--landmark-cnn); add --landmark-cnn" in proc.stderr


def test_a_missing_landmark_file_names_it(tiny_faces, tmp_path, run_script):
    missing = tmp_path / "pretrain_output" / "part_vit_B_34epoch.pth"
    proc = run_script(
        "train.py",
        [
            "--dataset",
            "synthfaces_tiny",
            "--data-path",
            tiny_faces,
            *TINY_MODEL_ARGS,
            "--landmark_cnn",
            "--landmark-weights",
            str(missing),
            "--batch-size",
            "8",
            "--output",
            str(tmp_path),
        ],
        check=False,
    )
    assert proc.returncode == 2 and str(missing) in proc.stderr
