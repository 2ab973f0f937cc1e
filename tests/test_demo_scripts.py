"""The shell demos' guards (shell/demo_common.sh, shell/claim_table.sh): bad settings stop them with one clear line."""

import subprocess
from pathlib import Path

import pytest

SHELL = Path(__file__).resolve().parents[1] / "shell"
# demo_common.sh runs shell/setup.sh when the README's .venv is missing: never from a test
pytestmark = pytest.mark.skipif(
    not (SHELL.parent / ".venv" / "bin" / "python").exists(), reason="the shell demos need the README's .venv"
)


def _bash(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_one_scale_refuses_runs_made_with_other_settings(tmp_path):
    out = tmp_path / "runs"
    script = f'source {SHELL}/demo_common.sh; one_scale "$1"; echo kept'
    first = _bash(f"set -- 'epochs=28'; {script}", tmp_path, OUT=str(out), RES=str(tmp_path / "res"))
    again = _bash(f"set -- 'epochs=28'; {script}", tmp_path, OUT=str(out), RES=str(tmp_path / "res"))
    other = _bash(f"set -- 'epochs=8'; {script}", tmp_path, OUT=str(out), RES=str(tmp_path / "res"))
    assert first.returncode == 0 and first.stdout.strip() == "kept"
    assert again.returncode == 0 and (out / "scale.txt").read_text() == "epochs=28\n"
    assert other.returncode == 2 and "kept" not in other.stdout
    assert other.stderr.strip() == (
        f"error: {out} holds runs made with other settings (epochs=28); these are epochs=8. "
        "Set FRESH=1 to start over, or OUT= and RES= to keep both"
    )
    assert (out / "scale.txt").read_text() == "epochs=28\n"


def test_claim_table_names_an_unknown_start(tmp_path):
    result = _bash(f"bash {SHELL}/claim_table.sh", tmp_path, START_FROM="imagenet")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: START_FROM=imagenet; expected arcface (the supervised start), dino (the DINO start) or part_fvit "
        "(a supervised start with a landmark CNN)"
    )
    assert list(tmp_path.iterdir()) == []  # nothing was created
