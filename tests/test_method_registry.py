"""The method registry: a method defined here, in a few dozen lines, runs through the unchanged scripts (train,
resume, extract, SSK, verify); the built-in methods' recipes, flag ownership and checkpoint routing."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from cli_helpers import load_state
from data_loader.protocol_writers import write_synthface_pair_set
from data_loader.recognition import labelled_training_set
from data_loader.sampler import ShuffleSampler
from model.meta_arch import MetaArch, MethodConfig
from trainer.data import data_config, load_datasets
from trainer.methods import Method, MethodSetup, get_method, method_names, register_method, unregister_method
from trainer.validation import clustering_validation


# ---------------------------------------------------------------------------------------------- the toy method
@dataclass
class ToyConfig(MethodConfig):
    method: ClassVar[str] = "toy_linear"
    img_size: int = 16
    embedding_size: int = 8
    num_classes: int = 0


class ToyLinear(MetaArch):
    """A linear embedder of 4 x 4-pooled pixels with a cross-entropy head."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(3 * 4 * 4, cfg.embedding_size)
        self.head = nn.Linear(cfg.embedding_size, cfg.num_classes)

    def batch_inputs(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
        return batch[0].to(device), batch[1].to(device)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(F.adaptive_avg_pool2d(images, 4).flatten(1))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.head(self.forward_features(images)), labels)}


class ToyMethod(Method):
    name = "toy_linear"
    config_class = ToyConfig
    summary = "a linear embedder with a cross-entropy head (test)"
    archs = ("linear",)
    lr_scaling = "none"
    recipe = {"arch": "linear", "opt": "sgd", "lr_base": 0.05, "weight_decay": 0.0, "warmup_epochs": 0, "epochs": 3}

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("Toy (--method toy_linear)")
        group.add_argument("--toy-embedding-size", type=int, default=8, help="embedding width (default: %(default)s)")

    @classmethod
    def build(cls, args: argparse.Namespace, image_size: int) -> MethodSetup:
        datasets = load_datasets(args, image_size)
        data = labelled_training_set(datasets, image_size)
        config = ToyConfig(img_size=image_size, embedding_size=args.toy_embedding_size, num_classes=data.num_classes)
        return MethodSetup(
            model=ToyLinear(config),
            model_config=config.to_dict(),
            train_set=data.train,
            sampler=ShuffleSampler(len(data.train), seed=args.seed),
            data_config={**data_config(args, datasets, image_size), **data.facts},
            **clustering_validation(datasets),
        )

    @classmethod
    def load_for_embedding(cls, ckpt, path, *, weights_only, flags=None) -> ToyLinear:
        model = ToyLinear(ToyConfig.from_dict(ckpt["model_config"]))
        model.load_checkpoint_state_dict(ckpt["state_dict"])
        return model


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture
def toy_method():
    """ToyMethod registered for one test (the registry is global)."""
    register_method(ToyMethod)
    yield ToyMethod
    unregister_method(ToyMethod.name)


def _toy_args(data: str, out: Path, experiment: str, *extra: str) -> list[str]:
    return [
        "--method",
        "toy_linear",
        "--dataset",
        "synthfaces_tiny",
        "--data-path",
        data,
        "--input-size",
        "3",
        "16",
        "16",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--val-interval",
        "1",
        "--val-kmeans-restarts",
        "1",
        "--output",
        str(out),
        "--experiment",
        experiment,
        "--no-progress",
        *extra,
    ]


def test_a_method_defined_in_a_test_trains_resumes_extracts_clusters_and_verifies(
    toy_method, tiny_faces, tmp_path, run_script, monkeypatch
):
    run_script("train.py", _toy_args(tiny_faces, tmp_path, "full", "--toy-embedding-size", "6"))
    run = tmp_path / "full"
    ckpt = load_state(run / "last.pth.tar")
    assert ckpt["method"] == "toy_linear" and ckpt["model_config"] == {
        "method": "toy_linear",
        "img_size": 16,
        "embedding_size": 6,
        "num_classes": 4,
    }
    assert ckpt["state_dict"]["head.weight"].shape == (4, 6)
    recipe = yaml.safe_load((run / "args.yaml").read_text())
    assert recipe["lr_base"] == 0.05 and recipe["epochs"] == 3 and recipe["recorded"]["lr_scaling"] == "none"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # --lr-base is the lr (rule "none"), no warm-up, then cosine: 0.05 x (1 + cos(pi t / 3)) / 2 at epoch t
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["train_lr"] for r in rows] == pytest.approx([0.05, 0.0375, 0.0125])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    # exact resume: a run stopped right after epoch 0's last.pth.tar, resumed from it, equals the uninterrupted run
    replace = os.replace

    def replace_then_stop(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if Path(dst).name == "last.pth.tar":
            raise SystemExit("killed after writing last.pth.tar")

    cut = _toy_args(tiny_faces, tmp_path, "cut", "--toy-embedding-size", "6")
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace_then_stop)
        assert run_script("train.py", cut, check=False).returncode == 1
    assert load_state(tmp_path / "cut" / "last.pth.tar")["epoch"] == 0
    run_script("train.py", cut + ["--resume", str(tmp_path / "cut" / "last.pth.tar")])
    resumed = load_state(tmp_path / "cut" / "last.pth.tar")
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)

    # extraction reads the method and the data settings from the checkpoint; SSK clusters the features
    feats = tmp_path / "feats"
    run_script(
        "extract_features.py",
        ["--checkpoint-weights", str(run / "last.pth.tar"), "--save-dir", str(feats), "--experiment", "toy", "-j", "0"],
    )
    train = torch.load(feats / "toy" / "features_train.pt", weights_only=True)
    assert train["features"].shape == (48, 6) and train["meta"]["model_config"]["method"] == "toy_linear"
    torch.testing.assert_close(train["features"].norm(dim=1), torch.ones(48))
    run_script("SSK.py", ["--save-dir", str(feats), "--experiment-idx", "toy", "--kmeans-restarts", "2"])
    results = json.loads((feats / "toy" / "ssk" / "default" / "ssk_results.json").read_text())
    assert results["M"] == 4 and results["train"]["num_samples"] == 36

    # verify.py writes under the checkpoint's run folder by default
    write_synthface_pair_set(tmp_path / "pairs.bin", identities=6, pairs=20, progress=False)
    run_script(
        "verify.py", ["--checkpoint-weights", str(run / "last.pth.tar"), "--targets", str(tmp_path / "pairs.bin")]
    )
    scored = json.loads((run / "verify" / "last" / "results.json").read_text())
    assert scored["image_size"] == 16 and set(scored["results"]) == {"pairs"}


def test_a_registered_method_is_listed_and_unregistered(toy_method):
    assert method_names()[:4] == ("facegcd", "recognition", "dino", "lafs") and "toy_linear" in method_names()
    assert get_method("toy_linear") is ToyMethod
    with pytest.raises(ValueError, match="a method named 'toy_linear' is registered already"):
        register_method(type("Other", (ToyMethod,), {}))
    with pytest.raises(ValueError, match="--method 'nope' is not registered; registered: facegcd, recognition"):
        get_method("nope")


@pytest.mark.parametrize(
    "method, flags, owner",
    [
        ("facegcd", ["--head", "arcface"], "--method recognition"),
        ("facegcd", ["--sample-rate", "0.1"], "--method recognition"),
        ("recognition", ["--prefix-length", "10"], "--method facegcd"),
        ("recognition", ["--prefix_length", "10"], "--method facegcd"),
        ("dino", ["--landmark-cnn"], "--method facegcd / --method recognition"),
    ],
)
def test_a_flag_of_another_method_is_an_error_naming_it(method, flags, owner, tmp_path, run_script):
    proc = run_script("train.py", ["--method", method, *flags, "--output", str(tmp_path)], check=False)
    assert proc.returncode == 2
    assert f"{flags[0]} applies to {owner}, not to --method {method}" in proc.stderr, proc.stderr


def test_the_cli_contract_holds_in_a_real_process(tmp_path, run_script):
    proc = run_script(
        "train.py",
        ["--method", "facegcd", "--head", "arcface", "--output", str(tmp_path)],
        check=False,
        subprocess_run=True,
    )
    assert proc.returncode == 2 and "--head applies to --method recognition, not to --method facegcd" in proc.stderr
    assert "Traceback" not in proc.stderr
    helped = run_script("train.py", ["--method", "dino", "--help"], subprocess_run=True)
    assert "DINO pretraining (--method dino)" in helped.stdout and "--prefix-length" not in helped.stdout
    assert "--patch_size" not in helped.stdout and "--patch-size" in helped.stdout  # one spelling per flag


@pytest.mark.parametrize(
    "method, expected",
    [  # (FaceGCD's --grad-from-block 11 needs --pretrained-weights, so its case trains every block)
        # DINO's main_dino.py: AdamW, 5e-4 per 256 images (linear), weight decay 0.04 -> 0.4, 10 warm-up epochs
        ("dino", {"opt": "adamw", "lr_base": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_epochs": 10}),
        # arcface_torch, IResNet-50: SGD lr 0.1, weight decay 5e-4, the backbone clipped at 5, insightface's input
        (
            "recognition",
            {
                "arch": "iresnet50",
                "opt": "sgd",
                "lr_base": 0.1,
                "weight_decay": 5e-4,
                "clip_grad": 5.0,
                "input_preset": "face",
            },
        ),
        # the FaceGCD reference: SGD-Nesterov, lr 0.1 per 256 images, weight decay 2e-5
        ("facegcd", {"arch": "vit_base", "opt": "sgd", "lr_base": 0.1, "weight_decay": 2e-5, "warmup_epochs": 5}),
    ],
)
def test_each_method_defaults_to_its_published_recipe(method, expected):
    from trainer.cli import parse_train_args

    args, spec = parse_train_args(["--method", method, *(["--grad-from-block", "0"] if method == "facegcd" else [])])
    assert {key: getattr(args, key) for key in expected} == expected and spec is get_method(method)


def test_recognition_with_a_vit_takes_arcface_torchs_vit_recipe_unless_told_otherwise():
    from trainer.cli import parse_train_args

    args, _ = parse_train_args(["--method", "recognition", "--arch", "vit_tiny", "--epochs", "40"])
    assert (args.opt, args.lr_base, args.weight_decay, args.warmup_epochs) == ("adamw", 1e-3, 0.1, 4)
    args, _ = parse_train_args(["--method", "recognition", "--arch", "vit_tiny", "--opt", "sgd", "--weight-decay", "0"])
    assert (args.opt, args.lr_base, args.weight_decay) == ("sgd", 1e-3, 0.0)


def test_dino_without_optimiser_flags_trains_with_dinos_recipe(tiny_faces, tmp_path, run_script):
    run_script(
        "train.py",
        [
            "--method",
            "dino",
            "--dataset",
            "synthfaces_tiny",
            "--data-path",
            tiny_faces,
            "--arch",
            "vit_tiny",
            "--patch-size",
            "16",
            "--input-size",
            "3",
            "32",
            "32",
            "--local-crops-number",
            "0",
            "--head-out-dim",
            "64",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--workers",
            "0",
            "--val-kmeans-restarts",
            "1",
            "--output",
            str(tmp_path),
            "--experiment",
            "dino",
            "--no-progress",
        ],
    )
    recorded = yaml.safe_load((tmp_path / "dino" / "args.yaml").read_text())
    assert (recorded["opt"], recorded["lr_base"], recorded["weight_decay"], recorded["weight_decay_end"]) == (
        "adamw",
        5e-4,
        0.04,
        0.4,
    )
    assert recorded["recorded"]["lr_scaling"] == "linear"
    log = (tmp_path / "dino" / "log.txt").read_text()
    # 5e-4 x 16 / 256 with the linear rule (the sqrt rule would give 1.25e-4)
    assert "lr 3.125e-05 = lr_base 0.0005 x 0.0625 (global batch 16, linear rule)" in log


def test_verify_on_a_pretraining_checkpoint_says_what_it_is_and_what_to_do(tmp_path, run_script):
    ckpt = tmp_path / "dino" / "last.pth.tar"
    ckpt.parent.mkdir()
    torch.save({"method": "dino", "model_config": {"method": "dino"}, "state_dict": {}}, ckpt)
    write_synthface_pair_set(tmp_path / "pairs.bin", identities=2, pairs=2, progress=False)
    proc = run_script(
        "verify.py", ["--checkpoint-weights", str(ckpt), "--targets", str(tmp_path / "pairs.bin")], check=False
    )
    assert proc.returncode == 2 and "is a self-supervised pretraining run (--method dino)" in proc.stderr
    assert f"--pretrained-weights {tmp_path / 'dino' / 'checkpoint.pth'}" in proc.stderr


def test_a_checkpoint_of_an_unregistered_method_is_refused(tmp_path, run_script):
    ckpt = tmp_path / "last.pth.tar"
    torch.save({"method": "toy_linear", "state_dict": {}}, ckpt)
    proc = run_script(
        "extract_features.py", ["--checkpoint-weights", str(ckpt), "--save-dir", str(tmp_path)], check=False
    )
    assert proc.returncode == 2
    assert "was written by --method toy_linear, which is not registered here" in proc.stderr
