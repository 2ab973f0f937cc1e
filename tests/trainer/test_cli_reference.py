"""docs/cli.md is the generated command-line reference; it must match the scripts' parsers."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import pytest

from trainer import cli_reference
from trainer.cli_reference import (
    SCRIPTS,
    Script,
    format_parser,
    format_training,
    generate,
    runtime_parser,
    script_parser,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


@pytest.fixture(scope="module")
def generated() -> str:
    return generate()


def test_docs_cli_md_matches_the_parsers(generated):
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    if current != generated:
        diff = "".join(
            list(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    generated.splitlines(keepends=True),
                    "docs/cli.md",
                    "generated",
                    n=1,
                )
            )[:60]
        )
        pytest.fail(
            f"docs/cli.md is out of date with the scripts' argparse parsers; regenerate it with\n"
            f"    {cli_reference.REGENERATE_COMMAND}\n(first lines of the diff):\n{diff}",
            pytrace=False,
        )


def _documented(script: Script) -> list[tuple[argparse.ArgumentParser, str]]:
    """(parser, the Markdown that documents it): train.py's shared section plus one method's section per method."""
    if script.module != "train":
        parser = script_parser(script)
        return [(parser, format_parser(parser, script))]
    import train
    from trainer.methods import method_names

    shared, *per_method = format_training(script).split("\n## `train.py --method ")
    sections = dict(zip(method_names(), per_method))
    separator = "\n## `train.py --method "
    return [
        (runtime_parser(train.get_args_parser(name)), shared + separator + sections[name]) for name in method_names()
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.file)
def test_every_visible_spelling_is_documented_and_hidden_ones_are_not_tabled(generated, script):
    for parser, section in _documented(script):
        assert section.split("\n## `train.py --method ")[0] in generated
        table_rows = [line for line in section.splitlines() if line.startswith("| `")]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                rows = [row for row in table_rows if f"`{flag}`" in row.split(" | ")[0]]
                if action.help == argparse.SUPPRESS:
                    assert not rows, f"{script.file}: hidden flag {flag} appears in a table"
                    assert f"`{flag}`" in section, f"{script.file}: hidden flag {flag} is not named"
                else:
                    assert len(rows) == 1, f"{script.file}: {flag} documented {len(rows)} times"
                    for alias in getattr(action, "aliases", []):
                        assert f"`{alias}`" in rows[0], f"{script.file}: alias {alias} of {flag} is not listed"
        assert "==SUPPRESS==" not in section
        assert "`-c`, `--config`" in section  # added at run time where a parser lacks it


def test_formatting_of_values_defaults_and_help():
    parser = argparse.ArgumentParser("demo", add_help=True)
    group = parser.add_argument_group("Things")
    group.add_argument("--size", "--size_px", dest="size", type=int, nargs=3, default=(3, 8, 8), metavar=tuple("CHW"))
    group.add_argument("--mode", choices=("a", "b"), default="a", help="pick a|b for <run> (default: %(default)s)")
    group.add_argument("--flag", action="store_true", help="100%% on")
    group.add_argument("--names", nargs="*", default=(), help="*any*")
    group.add_argument("--need", required=True, help="needed")
    group.add_argument("--quiet-compat", action="store_true", help=argparse.SUPPRESS)
    runtime_parser(parser)  # a required option must not break the -c/--config addition
    text = format_parser(parser, Script("demo.py", "demo", "a demo"))
    lines = text.splitlines()
    assert "### Things" in lines and "### General" in lines
    assert "| `--size`, `--size_px` | `C H W` (int) | `3 8 8` |  |" in lines
    assert "| `--mode` | one of `a`, `b` | `a` | pick a\\|b for &lt;run&gt; (default: a) |" in lines
    assert "| `--flag` | switch | off | 100% on |" in lines
    assert "| `--names` | str (zero or more) | (empty) | \\*any\\* |" in lines
    assert "| `--need` | str | required | needed |" in lines
    assert not any(line.startswith("| `--quiet-compat`") for line in lines)
    assert "`--quiet-compat`." in text
    assert not any("`-h`" in line for line in lines)


def test_check_and_write(tmp_path, capsys):
    target = tmp_path / "cli.md"
    assert cli_reference.main(["--check", str(target)]) == 1
    assert cli_reference.REGENERATE_COMMAND in capsys.readouterr().err
    assert cli_reference.main(["--write", str(target)]) == 0
    assert cli_reference.main(["--check", str(target)]) == 0
