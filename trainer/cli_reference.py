"""Markdown reference of the scripts' command-line options, generated from their argparse parsers.

``docs/cli.md`` is this module's output; a test compares the two, so the reference cannot drift from the code.

    python -m trainer.cli_reference                      # print the reference
    python -m trainer.cli_reference --write docs/cli.md  # regenerate the file
    python -m trainer.cli_reference --check docs/cli.md  # exit 1 when the file is out of date

Each script gets one table per argument group, in the order of ``--help``: every spelling of each flag, the kind of
value it takes, its default and its help text. Options whose help is ``argparse.SUPPRESS`` (flags accepted only so
that the reference release's commands run unchanged) are left out of the tables and named in one line instead. The
parsers are taken as the scripts see them at run time, i.e. after ``utils.config.parse_args_with_config`` has added
``-c/--config`` where a parser lacks it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = Path("docs") / "cli.md"
REGENERATE_COMMAND = f"python -m trainer.cli_reference --write {DOC_PATH.as_posix()}"


@dataclass(frozen=True)
class Script:
    """A documented script: its file name and the module holding ``get_args_parser``."""

    file: str
    module: str
    summary: str


SCRIPTS = (
    Script("train.py", "train", "step 1, training (writes `<output>/<experiment>/`)"),
    Script("extract_features.py", "extract_features", "step 2, feature extraction from a trained checkpoint"),
    Script("SSK.py", "SSK", "step 3, semi-supervised k-means and scoring"),
    Script("verify.py", "verify", "face verification of a checkpoint on pair sets and IJB-style benchmarks"),
    Script("discover.py", "discover", "open-world discovery of the people in a folder of raw photos"),
)

_DEFAULT_GROUP_TITLES = {"positional arguments": "Positional arguments", "options": "General"}


def _import_script(module: str):
    """Import a top-level script as a module (the repository root is put on ``sys.path`` if needed)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(module)


def runtime_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser as the script uses it: ``parse_args_with_config`` adds ``-c/--config`` when it is missing.

    Args:
        parser: a script's parser (modified in place).

    Returns:
        The same parser.
    """
    from utils.config import parse_args_with_config

    # parse_args_with_config adds the flag before parsing; parsing no arguments is cheap and its outcome (a
    # namespace, or argparse's exit when a parser has required options) does not matter here.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        parse_args_with_config(parser, [])
    return parser


def script_parser(script: Script) -> argparse.ArgumentParser:
    """Build ``script``'s parser from ``<module>.get_args_parser()``, as the script sees it at run time."""
    return runtime_parser(_import_script(script.module).get_args_parser())


def _escape(text: str) -> str:
    """Make free text safe inside a Markdown table cell (pipes, HTML-like ``<name>`` placeholders, emphasis)."""
    text = " ".join(str(text).split())
    for old, new in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(old, new)
    return text


def _code(text: str) -> str:
    """Inline code span for a table cell (pipes still need escaping inside GitHub tables)."""
    text = str(text).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _is_hidden(action: argparse.Action) -> bool:
    return action.help == argparse.SUPPRESS


def _is_help(action: argparse.Action) -> bool:
    return isinstance(action, argparse._HelpAction)


def _flags(action: argparse.Action) -> str:
    """The flag's spellings: the canonical ones, then the accepted aliases (``utils.config.hide_alias_spellings``)."""
    names = ", ".join(_code(name) for name in action.option_strings or [action.dest])
    aliases = getattr(action, "aliases", [])
    return names + (f" (also {', '.join(_code(alias) for alias in aliases)})" if aliases else "")


def _value(action: argparse.Action) -> str:
    """What the option takes: a switch, a choice, or typed value(s)."""
    if action.nargs == 0:
        return "switch"
    if action.choices is not None:
        base = "one of " + ", ".join(_code(c) for c in action.choices)
    else:
        base = getattr(action.type, "__name__", None) or "str"
    if isinstance(action.metavar, tuple):
        return f"{_code(' '.join(action.metavar))} ({base})"
    if isinstance(action.nargs, int) and action.nargs > 1:
        return f"{action.nargs} × {base}"
    suffix = {"+": " (one or more)", "*": " (zero or more)", "?": " (optional)"}.get(action.nargs, "")
    return base + suffix


def _format_default(action: argparse.Action) -> str:
    """The default as one would read it on a command line."""
    if action.required:
        return "required"
    default = action.default
    if default is argparse.SUPPRESS or default is None:
        return "–"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return _code(" ".join(str(v) for v in default)) if default else "(empty)"
    if isinstance(default, str) and default == "":
        return _code('""')
    return _code(default)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """Help text with argparse's ``%(default)s``-style placeholders expanded, as ``--help`` prints it."""
    if not action.help:
        return ""
    return _escape(parser._get_formatter()._expand_help(action))


def _group_title(group: argparse._ArgumentGroup) -> str:
    return _DEFAULT_GROUP_TITLES.get(group.title, group.title or "Options")


def _group_tables(parser: argparse.ArgumentParser, groups: Sequence[argparse._ArgumentGroup]) -> tuple[list, list]:
    """Markdown tables of ``groups`` (one per group, in order) and the hidden flags among them."""
    lines: list[str] = []
    hidden: list[str] = []
    for group in groups:
        shown = []
        for action in group._group_actions:
            if _is_help(action):
                continue
            if _is_hidden(action):
                hidden.extend(action.option_strings or [action.dest])
                continue
            shown.append(action)
        if not shown:
            continue
        lines += ["", f"### {_escape(_group_title(group))}", ""]
        if group.description:
            lines += [_escape(group.description), ""]
        lines += ["| Flags | Value | Default | Description |", "|---|---|---|---|"]
        for action in shown:
            cells = (_flags(action), _value(action), _format_default(action), _help(parser, action))
            lines.append("| " + " | ".join(cells) + " |")
    return lines, hidden


def _hidden_note(hidden: Sequence[str]) -> list[str]:
    if not hidden:
        return []
    return [
        "",
        "Also accepted without effect and hidden from `--help` (so that the reference release's commands run "
        "unchanged): " + ", ".join(_code(flag) for flag in hidden) + ".",
    ]


def format_parser(parser: argparse.ArgumentParser, script: Script) -> str:
    """Markdown section of one script: a heading, one table per argument group and the hidden flags.

    Args:
        parser: the script's (runtime) parser.
        script: which script it is.

    Returns:
        The section, ending with a newline.
    """
    lines = [f"## `{script.file}`", "", f"{_escape(parser.prog)}: {script.summary}."]
    if parser.description:
        lines += ["", _escape(parser.description)]
    if parser.epilog:
        lines += ["", _escape(parser.epilog)]
    tables, hidden = _group_tables(parser, parser._action_groups)
    return "\n".join(lines + tables + _hidden_note(hidden)) + "\n"


def format_training(script: Script) -> str:
    """Markdown section of ``train.py``: the flags every method shares (defaults: the default method's recipe), then
    per registered method its summary, its recipe (the shared flags' defaults it sets) and its own flags."""
    module = _import_script(script.module)
    from trainer.methods import get_method, method_names
    from trainer.optim import LR_SCALING_RULES

    parsers = {name: runtime_parser(module.get_args_parser(name)) for name in method_names()}
    titles = [{group.title for group in parser._action_groups} for parser in parsers.values()]
    shared = set.intersection(*titles)
    default = next(iter(parsers))
    first = parsers[default]
    lines = [
        f"## `{script.file}`",
        "",
        f"{_escape(first.prog)}: {script.summary}. `train.py --method NAME --help` lists the flags of one method. "
        "The flags below are shared by every method; their defaults are the default method's recipe, and each method "
        "below sets its own (a flag of another method is an error).",
    ]
    tables, hidden = _group_tables(first, [g for g in first._action_groups if g.title in shared])
    lines += tables + _hidden_note(hidden)
    for name, parser in parsers.items():
        method = get_method(name)
        lines += ["", f"## `train.py --method {name}`", "", _escape(method.summary) + "."]
        rule = LR_SCALING_RULES[method.lr_scaling]
        lines += ["", f"Learning rate: {_escape(rule)}. Recipe (defaults of shared flags):", ""]
        by_dest = {action.dest: action for action in parser._actions if action.option_strings}
        recipe = [
            f"{_code(by_dest[dest].option_strings[-1])} {_format_default(by_dest[dest])}"
            for dest in method.recipe
            if dest in by_dest and by_dest[dest].container.title in shared
        ]
        lines.append(", ".join(recipe) + ".")
        tables, _ = _group_tables(parser, [g for g in parser._action_groups if g.title not in shared])
        lines += [line.replace("### ", "#### ", 1) if line.startswith("### ") else line for line in tables]
    return "\n".join(lines) + "\n"


def generate(scripts: Sequence[Script] = SCRIPTS) -> str:
    """The whole reference: a header, then one section per script.

    Args:
        scripts: the scripts to document, in order.

    Returns:
        Markdown text, ending with a newline.
    """
    header = [
        "# Command-line reference",
        "",
        "<!-- Generated by trainer/cli_reference.py from the scripts' argparse parsers; do not edit by hand. -->",
        "",
        f"Generated from the parsers of {', '.join(f'`{s.file}`' for s in scripts)}; do not edit this file by "
        f"hand. After changing a flag, regenerate it with `{REGENERATE_COMMAND}` "
        "(`tests/trainer/test_cli_reference.py` fails while it is out of date).",
        "",
        "Conventions: each flag is listed by its canonical, hyphenated spelling; the spellings after *also* (the "
        "reference release's underscores) are accepted as the same option; *switch* means the flag takes no value; "
        "– means no default (unset). Every script also "
        "accepts `-c/--config FILE`, a YAML mapping of option names (e.g. `lr_base` or `lr-base`) to values that "
        "replaces the defaults below; flags on the command line still win. How the options fit together is "
        "described in [method.md](method.md); how a method plugs in, in [architecture.md](architecture.md).",
    ]
    sections = [
        format_training(script) if script.module == "train" else format_parser(script_parser(script), script)
        for script in scripts
    ]
    return "\n".join(header) + "\n\n" + "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    """Print, write or check the reference; returns the exit status."""
    parser = argparse.ArgumentParser(description="Markdown reference of the scripts' command-line options")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--write", metavar="PATH", help=f"write the reference to PATH (e.g. {DOC_PATH.as_posix()})")
    target.add_argument("--check", metavar="PATH", help="exit with status 1 when PATH differs from the reference")
    args = parser.parse_args(argv)
    text = generate()
    if args.write:
        path = Path(args.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
        return 0
    if args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            print(f"{path} is out of date; regenerate it with: {REGENERATE_COMMAND}", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
