"""Two-stage argument parsing with a YAML config file (timm's ``-c/--config``) and ``args.yaml`` output.

References: timm ``train.py`` (``_parse_args``: a small parser reads ``-c/--config``, its YAML becomes
``parser.set_defaults``, then the full parse; the resolved arguments are saved as ``args.yaml``).
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from utils.checkpoint import atomic_write_text

logger = logging.getLogger(__name__)

CONFIG_FLAGS = ("-c", "--config")
# Section of args.yaml with what the run determined itself (e.g. the precision used); not an argument, skipped on load.
RECORDED_KEY = "recorded"


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of argument names to values.

    Args:
        path: the YAML file.

    Returns:
        The mapping (empty for an empty file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file given with -c/--config not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(
            f"config file {path} must hold a mapping of argument names to values, got {type(cfg).__name__}"
        )
    return cfg


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` where an optional ``-c/--config`` YAML file supplies the defaults.

    Precedence: command line > config file > parser defaults. Config keys are argument destinations
    (``lr_base``); the dashed spelling (``lr-base``) is accepted too. ``-c/--config`` is added to ``parser`` when it
    lacks it, so it shows in ``--help`` and the path ends up in ``args.config``.

    Args:
        parser: the full argument parser (modified: defaults from the config file are set on it).
        argv: arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The parsed arguments.

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: the config file is not a YAML mapping or has keys that are not arguments of ``parser``.
    """
    if not any(flag in parser._option_string_actions for flag in CONFIG_FLAGS):
        parser.add_argument(*CONFIG_FLAGS, default="", metavar="FILE", help="YAML file of argument defaults")
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument(*CONFIG_FLAGS, default="", metavar="FILE")
    config_args, _ = config_parser.parse_known_args(argv)
    if config_args.config:
        cfg = load_yaml_config(config_args.config)
        cfg.pop(RECORDED_KEY, None)
        dests = {action.dest for action in parser._actions if action.dest != argparse.SUPPRESS}
        resolved, unknown = {}, []
        for key, value in cfg.items():
            dest = key if key in dests else str(key).replace("-", "_")
            if dest in dests:
                resolved[dest] = value
            else:
                unknown.append(str(key))
        if unknown:
            raise ValueError(
                f"config file {config_args.config} has keys that are not arguments of this script: "
                f"{', '.join(sorted(unknown))}"
            )
        parser.set_defaults(**resolved)
        logger.info("defaults from config file %s: %s", config_args.config, sorted(resolved))
    return parser.parse_args(argv)


def _to_yaml_value(value: Any) -> Any:
    """Plain YAML form of argument values (paths and devices as strings, tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_to_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_yaml_value(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return _to_yaml_value(value.value)
    if isinstance(value, (os.PathLike, torch.device)):
        return str(value)
    return value


def save_args_yaml(
    args: argparse.Namespace | dict, path: str | os.PathLike, recorded: dict[str, Any] | None = None
) -> Path:
    """Write the resolved arguments as YAML (atomically); the file works as a ``-c/--config`` file.

    Args:
        args: the parsed arguments (or ``vars(args)``).
        path: destination, e.g. ``<output>/args.yaml``.
        recorded: facts the run determined (e.g. the precision used), written under ``recorded:`` and skipped when
            the file is read back with ``-c``.

    Returns:
        The written path.
    """
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    if recorded:
        values = {**values, RECORDED_KEY: recorded}
    text = yaml.safe_dump(_to_yaml_value(values), default_flow_style=False, sort_keys=False)
    return atomic_write_text(path, text)
