"""Command lines assembled from the method registry: the training parser of one method, its two-stage parse, and the
model flags of the scripts that rebuild a model from a checkpoint (extraction, SSK).

``train.py --method NAME`` shows and accepts the shared flags plus NAME's own group, with NAME's recipe as defaults.
A flag of another method is an error naming the flag and the methods it belongs to.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trainer.args import (
    add_backbone_args,
    add_compat_args,
    add_data_args,
    add_logging_args,
    add_optimizer_args,
    add_runtime_args,
    add_validation_args,
    explicit_dests,
)
from trainer.methods import Method, get_method, method_names
from trainer.methods.base import UNNAMED_CHECKPOINT_METHOD, VIT_ARCHS
from trainer.optim import LR_SCALING_RULES
from utils.config import apply_config_defaults, hide_alias_spellings, load_yaml_config
from utils.presets import GCD_PRESET

DEFAULT_METHOD = UNNAMED_CHECKPOINT_METHOD  # the paper's method: the reference's commands name none


def get_train_parser(method: str = DEFAULT_METHOD, add_help: bool = True) -> argparse.ArgumentParser:
    """The training parser of ``method``: shared groups, the method's own group(s), its recipe as defaults."""
    spec = get_method(method)
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=f"Train a model with one method of the registry. --method {method}: {spec.summary}. "
        f"Learning rate: {LR_SCALING_RULES[spec.lr_scaling]}. Run train.py --method NAME --help for another method's "
        "flags and recipe.",
        add_help=add_help,
        allow_abbrev=False,
    )
    parser.add_argument(
        "-c", "--config", default="", help="YAML file whose keys set parser defaults, e.g. an args.yaml (default: none)"
    )
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=method_names(),
        help=f"training method: {', '.join(method_names())} (default: %(default)s)",
    )
    add_data_args(parser)
    add_backbone_args(parser, spec.archs, spec.recipe.get("arch", VIT_ARCHS[-1]))
    spec.add_args(parser)
    add_optimizer_args(parser)
    add_validation_args(parser)
    add_logging_args(parser)
    add_runtime_args(parser)
    add_compat_args(parser)
    parser.set_defaults(**spec.recipe, method=method)
    return hide_alias_spellings(parser)


def _method_from(argv: Sequence[str]) -> str:
    """``--method`` from the command line, else from the ``-c`` config file, else the default."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("-c", "--config", default="")
    probe.add_argument("--method", default=None)
    known, _ = probe.parse_known_args(argv)
    if known.method is not None:
        return known.method
    if known.config:
        return str(load_yaml_config(known.config).get("method", DEFAULT_METHOD))
    return DEFAULT_METHOD


def _foreign_flag_error(unknown: Sequence[str], method: str) -> str | None:
    """The error for the first unknown option that belongs to another method, or None."""
    owners: dict[str, list[str]] = {}
    for other in method_names():
        if other == method:
            continue
        parser = get_train_parser(other, add_help=False)
        for spelling, action in parser._option_string_actions.items():
            owners.setdefault(spelling, [])
            if other not in owners[spelling]:
                owners[spelling].append(other)
    for token in unknown:
        flag = token.split("=", 1)[0]
        if flag.startswith("-") and owners.get(flag):
            methods = " / ".join(f"--method {m}" for m in owners[flag])
            return f"{flag} applies to {methods}, not to --method {method}; drop it or choose that method"
    return None


def parse_train_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, type[Method]]:
    """Parse training flags in two stages: find ``--method`` (command line or config file), then parse with that
    method's parser; fill the method's flag-dependent defaults (``Method.resolve_args``).

    Returns:
        The arguments and the method.

    Raises:
        SystemExit: status 2 with argparse's message, or naming a flag of another method.
        ValueError: a config file that cannot be read, or flags the method rejects.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    method = _method_from(argv)
    spec = get_method(method)
    parser = get_train_parser(method)
    config_dests = apply_config_defaults(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = _foreign_flag_error(unknown, method)
        parser.error(message or f"unrecognized arguments: {' '.join(unknown)}")
    if args.input_preset is None:
        args.input_preset = GCD_PRESET
    spec.resolve_args(args, explicit_dests(parser, argv) | config_dests)
    return args, spec


def add_checkpoint_model_args(parser: argparse.ArgumentParser) -> None:
    """Model flags of the scripts that rebuild a trained model (extraction, SSK): the backbone group and every
    registered method's :meth:`Method.add_embedding_args` (the reference's FaceGCD flags); a checkpoint that
    describes its model wins over them."""
    archs = tuple(dict.fromkeys(arch for name in method_names() for arch in get_method(name).archs))
    add_backbone_args(parser, archs, get_method(DEFAULT_METHOD).recipe.get("arch", VIT_ARCHS[-1]))
    for name in method_names():
        get_method(name).add_embedding_args(parser)
