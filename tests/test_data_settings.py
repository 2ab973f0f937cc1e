"""The settings that define D_L and D_U travel with the checkpoint into extraction (and SSK), and contradicting
flags are errors; a frozen random backbone is refused."""

import json
import shutil

import pytest
import torch

from cli_helpers import TINY_MODEL_ARGS, run_cli
from data_loader import build_gcd_datasets


def _one_epoch_args(dataset: str, data, out, experiment: str, *extra: str) -> list[str]:
    """A 1-epoch tiny training run that keeps its last epoch as model_best."""
    return [
        *("--dataset", dataset, "--data-path", str(data), *TINY_MODEL_ARGS, *extra),
        *("--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--val-kmeans-init", "1"),
        *("--checkpoint-select", "last", "--output", str(out), "--experiment", experiment, "--no-progress"),
    ]


@pytest.fixture(scope="module")
def run_030(tiny_faces, tmp_path_factory) -> dict:
    """A 1-epoch run trained with --prop_train_labels 0.3 on a private copy of the tiny preset."""
    data = tmp_path_factory.mktemp("data") / "tiny"
    shutil.copytree(tiny_faces, data)
    out = tmp_path_factory.mktemp("train")
    run_cli("train.py", _one_epoch_args("synthfaces_tiny", data, out, "p03", "--prop_train_labels", "0.3"))
    return {"data": data, "checkpoint": out / "p03" / "model_best.pth.tar"}


def _extract_args(run: dict, save_dir, experiment: str, *extra: str) -> list[str]:
    return [
        "--checkpoint_weights",
        str(run["checkpoint"]),
        "--save_dir",
        str(save_dir),
        "--experiment",
        experiment,
        "--batch-size",
        "16",
        "--workers",
        "0",
        *extra,
    ]


def test_extraction_reads_the_labelled_subset_from_the_checkpoint(run_030, tmp_path, run_script):
    # No --dataset, --data-path or --prop_train_labels: all come from the checkpoint.
    run_script("extract_features.py", _extract_args(run_030, tmp_path, "feat"))
    train = torch.load(tmp_path / "feat" / "features_train.pt", weights_only=True)
    expected = build_gcd_datasets("synthfaces_tiny", run_030["data"], image_size=32, prop_train_labels=0.3)
    assert torch.equal(train["labelled_mask"], expected.labelled_mask)
    # 0.3 of the 24 known-class images, not the default 0.5
    assert int(train["labelled_mask"].sum()) == int(0.3 * 24) != int(0.5 * 24)
    stored = torch.load(run_030["checkpoint"], weights_only=True)["data_config"]
    meta = json.loads((tmp_path / "feat" / "extraction.json").read_text())["train"]
    assert meta["prop_train_labels"] == 0.3 and meta["data_config"]["labelled_digest"] == stored["labelled_digest"]
    assert stored["prop_train_labels"] == 0.3 and stored["dataset"] == "synthfaces_tiny"
    assert meta["precision"] == "fp32" and meta["precision_reason"] == "no --amp"


@pytest.mark.parametrize(
    "flags, given, trained",
    [
        (["--prop_train_labels", "0.5"], "--prop-train-labels 0.5", "--prop-train-labels 0.3"),
        (["--split-seed", "3"], "--split-seed 3", "--split-seed 0"),
        (["--num-known", "2"], "--num-known 2", "--num-known 4"),
        (["--dataset", "synthfaces_quick"], "--dataset synthfaces_quick", "--dataset synthfaces_tiny"),
    ],
)
def test_a_contradicting_data_flag_is_an_error_naming_both_values(run_030, tmp_path, run_script, flags, given, trained):
    proc = run_script("extract_features.py", _extract_args(run_030, tmp_path, "bad", *flags), check=False)
    assert proc.returncode == 2
    assert given in proc.stderr and trained in proc.stderr
    assert not (tmp_path / "bad" / "features_train.pt").exists()


def test_the_same_values_given_explicitly_are_accepted(run_030, tmp_path, run_script):
    flags = ["--dataset", "SynthFaces_Tiny", "--data-path", str(run_030["data"]), "--prop_train_labels", "0.3"]
    run_script("extract_features.py", _extract_args(run_030, tmp_path, "same", *flags))
    assert (tmp_path / "same" / "features_test.pt").is_file()


def test_another_data_path_needs_data_relocated_and_the_same_listing(run_030, tmp_path, run_script):
    moved = tmp_path / "moved"
    shutil.copytree(run_030["data"], moved)
    proc = run_script(
        "extract_features.py", _extract_args(run_030, tmp_path, "m", "--data-path", str(moved)), check=False
    )
    assert proc.returncode == 2 and "--data-relocated" in proc.stderr and str(moved) in proc.stderr
    run_script(
        "extract_features.py", _extract_args(run_030, tmp_path, "m", "--data-path", str(moved), "--data-relocated")
    )
    # a tree that lost an image is not the benchmark the checkpoint was trained on
    victim = sorted((moved / "train").glob("*/*"))[0]
    victim.unlink()
    proc = run_script(
        "extract_features.py",
        _extract_args(run_030, tmp_path, "m2", "--data-path", str(moved), "--data-relocated"),
        check=False,
    )
    assert proc.returncode == 2 and "num_train: checkpoint 48, now 47" in proc.stderr


def test_ssk_with_a_checkpoint_refuses_a_contradicting_flag(run_030, tmp_path, run_script):
    args = ["--checkpoint_weights", str(run_030["checkpoint"]), "--save_dir", str(tmp_path), "--experiment_idx", "s"]
    proc = run_script("SSK.py", [*args, "--prop_train_labels", "0.5", "--workers", "0"], check=False)
    assert proc.returncode == 2 and "--prop-train-labels 0.5" in proc.stderr and "0.3" in proc.stderr


def test_grad_from_block_without_pretrained_weights_is_refused(tiny_faces, tmp_path, run_script):
    args = ["--dataset", "synthfaces_tiny", "--data-path", tiny_faces, *TINY_MODEL_ARGS, "--epochs", "1"]
    args += ["--output", str(tmp_path), "--experiment", "frozen", "--grad-from-block", "11"]
    proc = run_script("train.py", args, check=False)
    assert proc.returncode != 0
    assert "--grad-from-block 11 without --pretrained-weights" in proc.stderr and "frozen random ViT" in proc.stderr
    assert not (tmp_path / "frozen" / "last.pth.tar").exists()


def test_own_identity_folders_train_extract_and_cluster_with_num_known(tiny_faces, tmp_path, run_script):
    """Any train/<id>, test/<id> tree: N from its folders, --num-known from training, carried into extraction."""
    root = tmp_path / "my_faces"
    for split in ("train", "test"):
        shutil.copytree(f"{tiny_faces}/{split}", root / split)
    n_ids = len(list((root / "train").iterdir()))
    out = tmp_path / "out"
    run_script("train.py", _one_epoch_args("identity_folders", root, out, "mine", "--num-known", "3"))
    ckpt = out / "mine" / "model_best.pth.tar"
    stored = torch.load(ckpt, weights_only=True)["data_config"]
    assert stored["dataset"] == "identity_folders" and stored["num_known"] == 3 and stored["num_classes"] == n_ids
    run_script(
        "extract_features.py",
        ["--checkpoint_weights", str(ckpt), "--save_dir", str(tmp_path), "--workers", "0", "--experiment", "mine"],
    )
    train = torch.load(tmp_path / "mine" / "features_train.pt", weights_only=True)
    assert torch.equal(train["known_mask"], train["labels"] < 3) and bool(train["known_mask"].any())
    assert bool((train["labels"][train["labelled_mask"]] < 3).all())
    run_script("SSK.py", ["--save_dir", str(tmp_path), "--experiment_idx", "mine", "--no-plots", "--k_means_init", "1"])
    results = json.loads((tmp_path / "mine" / "ssk" / "default" / "ssk_results.json").read_text())
    assert results["K"] == n_ids and results["M"] == 3


def test_a_checkpoint_whose_data_path_is_gone_asks_for_the_new_location(run_030, tmp_path, run_script):
    """Nothing is generated or read at a path that only existed where the model was trained."""
    ckpt = torch.load(run_030["checkpoint"], map_location="cpu", weights_only=True)
    ckpt["data_config"]["data_path"] = str(tmp_path / "elsewhere" / "tiny")
    moved = tmp_path / "moved.pth.tar"
    torch.save(ckpt, moved)
    args = ["--checkpoint_weights", str(moved), "--save_dir", str(tmp_path), "--experiment", "x", "--workers", "0"]
    proc = run_script("extract_features.py", args, check=False)
    assert proc.returncode == 2 and "does not exist here" in proc.stderr and "--data-relocated" in proc.stderr
    assert not (tmp_path / "elsewhere").exists()
    run_script("extract_features.py", [*args, "--data-path", str(run_030["data"]), "--data-relocated"])
    assert (tmp_path / "x" / "features_train.pt").is_file()


def test_resume_refuses_other_data_settings(run_030, run_script):
    last = run_030["checkpoint"].parent / "last.pth.tar"
    out = run_030["checkpoint"].parent.parent
    args = _one_epoch_args("synthfaces_tiny", run_030["data"], out, "p03", "--prop_train_labels", "0.5")
    proc = run_script("train.py", [*args, "--epochs", "2", "--resume", str(last)], check=False)
    assert proc.returncode == 2 and "continues a run with other settings" in proc.stderr
    assert "--prop-train-labels 0.5 (the run: 0.3)" in proc.stderr
