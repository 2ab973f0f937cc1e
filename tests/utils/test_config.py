"""Tests for utils/config.py: YAML defaults under the command line, unknown keys, args.yaml round trip."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from utils.config import parse_args_with_config, save_args_yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr-base", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--opt", default="sgd")
    parser.add_argument("--input-size", type=int, nargs=3, default=None)
    parser.add_argument("--layer-embed", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("./output/train"))
    return parser


def test_no_config_uses_parser_defaults():
    args = parse_args_with_config(_parser(), ["--epochs", "3"])
    assert args.epochs == 3 and args.lr_base == 0.1 and args.config == ""


def test_config_sets_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr_base: 1e-3\nepochs: 7\nlayer-embed: true\ninput_size: [3, 112, 112]\nopt: adamw\n")
    args = parse_args_with_config(_parser(), ["-c", str(cfg), "--opt", "sgd"])
    assert args.lr_base == pytest.approx(1e-3)  # YAML reads 1e-3 as a string; argparse converts it
    assert args.epochs == 7 and args.layer_embed is True and args.input_size == [3, 112, 112]
    assert args.opt == "sgd" and args.config == str(cfg)


def test_config_unknown_keys_and_missing_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 3\nlearning_rate: 0.1\nwarmup: 5\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*learning_rate, warmup"):
        parse_args_with_config(_parser(), ["--config", str(cfg)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_args_with_config(_parser(), ["-c", str(tmp_path / "missing.yaml")])
    cfg.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_args_with_config(_parser(), ["-c", str(cfg)])


def test_save_args_yaml_round_trips_as_config(tmp_path):
    args = parse_args_with_config(_parser(), ["--epochs", "5", "--input-size", "3", "64", "64", "--layer-embed"])
    path = save_args_yaml(args, tmp_path / "run" / "args.yaml")
    saved = yaml.safe_load(path.read_text())
    assert saved["epochs"] == 5 and saved["output"] == "output/train" and saved["input_size"] == [3, 64, 64]
    assert list(path.parent.iterdir()) == [path]

    again = parse_args_with_config(_parser(), ["-c", str(path)])
    assert {k: v for k, v in vars(again).items() if k != "config"} == {
        k: v for k, v in vars(args).items() if k != "config"
    }
