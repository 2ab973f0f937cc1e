"""extract_features.py and SSK.py on a real (tiny) trained checkpoint, single- and multi-process."""

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY_MODEL_ARGS


def _extract(run, save_dir, experiment, *extra):
    return [
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        run["data"],
        "--checkpoint_weights",
        str(run["checkpoint"]),
        "--save_dir",
        str(save_dir),
        "--experiment",
        experiment,
        "--batch-size",
        "5",
        "--workers",
        "0",
        *extra,
    ]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.distributed
def test_two_process_extraction_equals_single_process_without_duplicates(tiny_run, tmp_path, run_script):
    run_script("extract_features.py", _extract(tiny_run, tmp_path, "one"))
    run_script("extract_features.py", _extract(tiny_run, tmp_path, "two"), nproc=2)
    for split, rows in (("train", 48), ("test", 16)):
        one, two = _load(tmp_path / "one" / f"features_{split}.pt"), _load(tmp_path / "two" / f"features_{split}.pt")
        assert torch.equal(one["uq_idx"], torch.arange(rows)) and torch.equal(two["uq_idx"], torch.arange(rows))
        torch.testing.assert_close(two["features"], one["features"], rtol=1e-5, atol=1e-6)
        for key in ("labels", "known_mask", "labelled_mask"):
            assert torch.equal(one[key], two[key]), key
        assert one["features"].dtype == torch.float32 and one["features"].shape == (rows, 192)
        torch.testing.assert_close(one["features"].norm(dim=1), torch.ones(rows))
        assert torch.equal(one["known_mask"], one["labels"] < 4)
    train = _load(tmp_path / "one" / "features_train.pt")
    assert int(train["labelled_mask"].sum()) == 12 and bool((train["labels"][train["labelled_mask"]] < 4).all())
    assert not _load(tmp_path / "one" / "features_test.pt")["labelled_mask"].any()
    meta = json.loads((tmp_path / "one" / "extraction.json").read_text())
    assert meta["train"]["rows"] == 48 and meta["train"]["model_config"]["layer_embed"] is True


REFERENCE_EXTRACTION = (
    "--pretrained --return-embed --save-images --pin-mem --experiment gcd_synth_pretrain_prefix10 --amp "
    "--prefix_tuning --prefix_length 10 --data-path DATA --dataset synthfaces_tiny --amp-impl apex "
    "--save_dir SAVE --landmark_cnn --pretrained_weights checkpoint.pth --checkpoint_weights CKPT "
    "--patch_size 16 --input-size 3 32 32"
)


def reference_extraction_args(data: str, save: Path, checkpoint: Path) -> list[str]:
    """The reference's documented extraction command with its paths pointing at existing things."""
    return (
        REFERENCE_EXTRACTION.replace("DATA", data).replace("SAVE", str(save)).replace("CKPT", str(checkpoint)).split()
    )


def test_reference_extraction_command_on_a_model_without_the_front_end_says_so(tiny_run, tmp_path, run_script):
    """The reference command adds --landmark_cnn; a checkpoint trained without the landmark front end refuses it."""
    args = reference_extraction_args(tiny_run["data"], tmp_path, tiny_run["checkpoint"])
    proc = run_script("extract_features.py", args + ["--workers", "0"], check=False)
    assert proc.returncode == 2
    assert "was trained without the landmark front end (--landmark-cnn); drop --landmark-cnn" in proc.stderr
    # without the flag the command runs, and the checkpoint's config wins over the other model flags
    proc = run_script(
        "extract_features.py", [a for a in args if a != "--landmark_cnn"] + ["--workers", "0", "--depth", "16"]
    )
    assert "--prefix-length 10 disagrees with the checkpoint's 2" in proc.stderr
    assert "--depth 16 disagrees with the checkpoint's 12" in proc.stderr
    train = _load(tmp_path / "gcd_synth_pretrain_prefix10" / "features_train.pt")
    assert train["meta"]["model_config"]["prefix_length"] == 2 and train["meta"]["model_config"]["layer_embed"]


def test_ssk_on_extracted_features_and_in_memory_features_agree(tiny_run, tmp_path, run_script):
    run_script("extract_features.py", _extract(tiny_run, tmp_path, "feat"))
    ssk = ["--max_kmeans_iter", "20", "--k_means_init", "2", "--no-plots", "--save_dir", str(tmp_path)]
    run_script("SSK.py", ["--experiment_idx", "feat", *ssk])
    # no features on disk under this name: SSK computes them from the checkpoint
    run_script(
        "SSK.py",
        [
            "--experiment_idx",
            "mem",
            "--checkpoint_weights",
            str(tiny_run["checkpoint"]),
            "--dataset",
            "synthfaces_tiny",
            "--data-path",
            tiny_run["data"],
            "--workers",
            "0",
            *ssk,
        ],
    )
    on_disk = json.loads((tmp_path / "feat" / "ssk" / "default" / "ssk_results.json").read_text())
    in_memory = json.loads((tmp_path / "mem" / "ssk" / "default" / "ssk_results.json").read_text())
    assert on_disk["train"]["v2"] == in_memory["train"]["v2"] and on_disk["test"]["v2"] == in_memory["test"]["v2"]
    assert on_disk["K"] == 8 and on_disk["M"] == 4 and on_disk["train"]["num_samples"] == 36


def test_checkpoint_of_the_wrong_shape_is_a_clear_error(tiny_run, tmp_path, run_script):
    ckpt = _load(tiny_run["checkpoint"])
    ckpt["state_dict"]["backbone.blocks.3.mlp.fc1.weight"] = torch.zeros(7, 7)
    bad = tmp_path / "bad.pth.tar"
    torch.save(ckpt, bad)
    proc = run_script("extract_features.py", _extract({**tiny_run, "checkpoint": bad}, tmp_path, "bad"), check=False)
    assert proc.returncode != 0
    assert "backbone.blocks.3.mlp.fc1.weight" in proc.stderr
    assert not (tmp_path / "bad" / "features_train.pt").exists()


def test_missing_checkpoint_names_the_path(tiny_run, tmp_path, run_script):
    missing = tmp_path / "nope.pth.tar"
    proc = run_script("extract_features.py", _extract({**tiny_run, "checkpoint": missing}, tmp_path, "x"), check=False)
    assert proc.returncode != 0 and str(missing) in proc.stderr


def test_untrained_and_pixel_baselines_extract(tiny_run, tmp_path, run_script):
    base = [
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        tiny_run["data"],
        *TINY_MODEL_ARGS,
        "--save_dir",
        str(tmp_path),
    ]
    run_script("extract_features.py", base + ["--experiment", "untrained"])
    run_script("extract_features.py", base + ["--experiment", "untrained_again"])
    run_script("extract_features.py", base + ["--experiment", "untrained_seed2", "--seed", "2"])
    run_script("extract_features.py", base + ["--experiment", "pixels", "--features", "pixels"])
    untrained = _load(tmp_path / "untrained" / "features_train.pt")["features"]
    assert untrained.shape == (48, 192)
    # the untrained baseline is a seeded random model: reproducible for a --seed, different across seeds
    assert torch.equal(untrained, _load(tmp_path / "untrained_again" / "features_train.pt")["features"])
    assert not torch.allclose(untrained, _load(tmp_path / "untrained_seed2" / "features_train.pt")["features"])
    assert _load(tmp_path / "pixels" / "features_train.pt")["features"].shape == (48, 3 * 16 * 16)
