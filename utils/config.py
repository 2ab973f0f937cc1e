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


def hide_alias_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Keep one spelling per flag in help and errors: the first hyphenated long option (plus a one-letter short
    option); the other spellings (the reference's underscores) stay accepted and are listed in ``action.aliases``.

    Args:
        parser: a fully built parser (modified in place).

    Returns:
        The same parser.
    """
    for action in parser._actions:
        if not action.option_strings or hasattr(action, "aliases"):
            continue
        short = [s for s in action.option_strings if not s.startswith("--")]
        long = [s for s in action.option_strings if s.startswith("--")]
        canonical = next((s for s in long if "_" not in s), long[0] if long else None)
        action.aliases = [s for s in long if s != canonical]
        action.option_strings = short + ([canonical] if canonical else [])
    return parser


def _config_dest(parser: argparse.ArgumentParser, key: str) -> str | None:
    """The destination a config-file key names: a destination itself, or any spelling of a flag without dashes."""
    dests = {action.dest for action in parser._actions if action.dest != argparse.SUPPRESS}
    if key in dests:
        return key
    for spelling in (f"--{key}", f"--{key.replace('_', '-')}", f"--{key.replace('-', '_')}"):
        action = parser._option_string_actions.get(spelling)
        if action is not None and action.dest != argparse.SUPPRESS:
            return action.dest
    return None


def apply_config_defaults(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> set[str]:
    """Read ``-c/--config`` from ``argv`` and make its YAML keys the parser's defaults.

    Config keys are argument destinations (``lr_base``) or flag spellings without the dashes (``lr-base``,
    ``val-kmeans-init``). ``-c/--config`` is added to ``parser`` when it lacks it.

    Returns:
        The destinations the config file set.

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: the config file is not a YAML mapping or has keys that are not arguments of ``parser``.
    """
    if not any(flag in parser._option_string_actions for flag in CONFIG_FLAGS):
        parser.add_argument(*CONFIG_FLAGS, default="", metavar="FILE", help="YAML file of argument defaults")
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument(*CONFIG_FLAGS, default="", metavar="FILE")
    config_args, _ = config_parser.parse_known_args(argv)
    if not config_args.config:
        return set()
    cfg = load_yaml_config(config_args.config)
    cfg.pop(RECORDED_KEY, None)
    resolved, unknown = {}, []
    for key, value in cfg.items():
        dest = _config_dest(parser, str(key))
        if dest is None:
            unknown.append(str(key))
        else:
            resolved[dest] = value
    if unknown:
        raise ValueError(
            f"config file {config_args.config} has keys that are not arguments of this script: "
            f"{', '.join(sorted(unknown))}"
        )
    parser.set_defaults(**resolved)
    logger.info("defaults from config file %s: %s", config_args.config, sorted(resolved))
    return set(resolved)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` where an optional ``-c/--config`` YAML file supplies the defaults.

    Precedence: command line > config file > parser defaults (see :func:`apply_config_defaults`).

    Args:
        parser: the full argument parser (modified: defaults from the config file are set on it).
        argv: arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The parsed arguments.
    """
    apply_config_defaults(parser, argv)
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
