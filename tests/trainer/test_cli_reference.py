"""docs/cli.md is the generated command-line reference; it must match the scripts' parsers in both directions, and
every option's --help states its default."""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
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

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = REPO_ROOT / "docs" / "cli.md"


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


def _doc_sections() -> dict[str, str]:
    """docs/cli.md's sections by heading (``train.py``, ``train.py --method facegcd``, ``SSK.py``, ...)."""
    sections: dict[str, str] = {}
    for chunk in DOC.read_text(encoding="utf-8").split("\n## `")[1:]:
        heading, _, body = chunk.partition("`")
        sections[heading] = body
    return sections


def _doc_flags(section: str) -> dict[str, bool]:
    """Every flag spelling a section documents, mapped to whether it is a switch: the backticked spellings of the
    tables' first column (those after "also" included) and of the line naming the hidden flags."""
    flags: dict[str, bool] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            first, value = line.split(" | ")[:2]
            flags.update((flag, value == "switch") for flag in re.findall(r"`(-[^`]+)`", first))
        elif line.startswith("Also accepted without effect"):
            flags.update((flag, True) for flag in re.findall(r"`(-[^`]+)`", line) if flag != "--help")
    return flags


@pytest.fixture(scope="module")
def documented_parsers() -> list[tuple[str, argparse.ArgumentParser, dict[str, bool]]]:
    """(script file, the parser its module builds, the flags docs/cli.md documents for it): train.py once per method
    (``train.get_args_parser(NAME)``; its shared section plus the method's), every other script with its own section
    (``<module>.get_args_parser()``)."""
    import train
    from trainer.methods import method_names

    sections = _doc_sections()
    result = []
    for name in method_names():
        flags = _doc_flags(sections["train.py"]) | _doc_flags(sections[f"train.py --method {name}"])
        result.append(("train.py", train.get_args_parser(name), flags))
    for script in SCRIPTS:
        if script.module != "train":
            module = cli_reference._import_script(script.module)
            result.append((script.file, module.get_args_parser(), _doc_flags(sections[script.file])))
    return result


def _rejected_by_the_script(script: str, flags: dict[str, bool]) -> list[str]:
    """The flags a real run of ``script`` rejects as unrecognized (each given a value unless it is a switch); the
    value names no file, so an accepted flag ends the run at once with another error."""
    argv = [token for flag, switch in flags.items() for token in ([flag] if switch else [flag, "/nonexistent/x.yaml"])]
    proc = subprocess.run(
        [sys.executable, script, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    unrecognized = [line for line in proc.stderr.splitlines() if "unrecognized arguments:" in line]
    return [flag for flag in flags if any(f" {flag} " in f"{line} " for line in unrecognized)]


@pytest.mark.parametrize("script", [s.file for s in SCRIPTS])
def test_every_option_of_docs_cli_md_is_accepted_and_every_option_of_the_parsers_is_documented(
    documented_parsers, script
):
    for file, parser, documented in documented_parsers:
        if file != script:
            continue
        accepted = set(parser._option_string_actions) - {"-h", "--help"}
        assert accepted - set(documented) == set(), f"{file}: options of the parser missing from docs/cli.md"
        # options the module's parser lacks (-c/--config, added where a script parses through utils.config):
        # what the script itself does with them decides
        added = {flag: switch for flag, switch in documented.items() if flag not in accepted}
        if added:
            assert _rejected_by_the_script(file, added) == [], f"{file} rejects options docs/cli.md lists"


def test_every_option_with_a_value_states_its_default_in_help(documented_parsers):
    missing = set()
    for file, parser, _ in documented_parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.nargs == 0 or action.required or action.help == argparse.SUPPRESS:
                continue
            if "(default: " not in formatter._expand_help(action):
                missing.add(f"{file} {'/'.join(action.option_strings)}")
    assert sorted(missing) == [], "options whose --help shows no default"
