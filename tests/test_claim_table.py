"""The seed table of shell/claim_table.sh (benchmarks/claim_table.py): mean and sample std over seeds, by hand."""

import json

import pytest

from benchmarks.claim_table import main


def _results(folder, train_all, test_all):
    run = folder / "ssk" / "default"
    run.mkdir(parents=True)
    split = lambda acc: {"v2": {"all": acc, "old": acc / 2, "new": 0.25}}  # noqa: E731
    (run / "ssk_results.json").write_text(json.dumps({"train": split(train_all), "test": split(test_all)}))
    return str(folder)


def test_mean_and_sample_std_over_seeds_by_hand(tmp_path, capsys):
    seeds = [_results(tmp_path / f"s{i}", acc, 0.5) for i, acc in enumerate((0.40, 0.50, 0.60))]
    single = _results(tmp_path / "pixels", 0.3, 0.2)
    assert main(["--row", "facegcd", *seeds, "--row", "raw pixels", single]) == 0
    lines = capsys.readouterr().out.splitlines()
    # All on D_U: mean 50.0, sample std sqrt(((-10)^2 + 0 + 10^2) / 2) = 10.0; Old halves both; New constant 25
    assert lines[2] == "| facegcd | 3 | 50.0 ± 10.0 | 25.0 ± 5.0 | 25.0 ± 0.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | 25.0 ± 0.0 |"
    assert lines[3] == "| raw pixels | 1 | 30.0 | 15.0 | 25.0 | 20.0 | 10.0 | 25.0 |"


def test_missing_results_name_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--row", "gcd", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "nowhere" in capsys.readouterr().err
