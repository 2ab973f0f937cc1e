"""utils.report: finding SSK results in features folders (ssk/<run>/) and the side-by-side table."""

import json
from pathlib import Path

import pytest

from utils import report


def write_results(folder: Path, all_acc: float) -> Path:
    """A results file whose v2 accuracies are ``all_acc`` (All), 1.0 (Old) and None (New) on both splits."""
    folder.mkdir(parents=True, exist_ok=True)
    acc = {"v2": {"all": all_acc, "old": 1.0, "new": None}}
    path = folder / report.RESULTS_FILE
    path.write_text(json.dumps({"train": acc, "test": acc}))
    return path


def test_run_dir_is_inside_the_features_folder_and_rejects_paths():
    assert report.ssk_run_dir("results/ytf", "GCD_base_prefix_gen") == Path("results/ytf/ssk/GCD_base_prefix_gen")
    for bad in ("", ".", "..", "a/b", "../x"):
        with pytest.raises(report.ReportInputError, match="must be one plain folder name"):
            report.ssk_run_dir("results/ytf", bad)


def test_the_only_run_of_a_features_folder_is_found(tmp_path, capsys):
    for name, acc in (("pixels", 0.25), ("trained", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "features_train.pt").write_bytes(b"")
        write_results(report.ssk_run_dir(tmp_path / name, report.DEFAULT_RUN), acc)
    assert report.main([str(tmp_path / "pixels"), str(tmp_path / "trained"), "--names", "raw pixels", "FaceGCD"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("raw pixels") and "  25.0   100.0     n/a" in lines[3]
    assert lines[4].startswith("FaceGCD") and "  50.0   100.0     n/a" in lines[4]


def test_several_runs_need_run_and_an_unknown_run_lists_the_found_ones(tmp_path, capsys):
    feats = tmp_path / "ytf"
    write_results(report.ssk_run_dir(feats, "GCD_base_prefix_gen"), 0.4)
    write_results(report.ssk_run_dir(feats, "k2000"), 0.3)
    (feats / report.SSK_SUBDIR / "unfinished").mkdir()
    with pytest.raises(SystemExit) as exc:
        report.main([str(feats)])
    assert exc.value.code == 2
    assert f"{feats} holds 2 SSK runs (GCD_base_prefix_gen, k2000); pick one with --run NAME" in capsys.readouterr().err
    assert report.load_results(feats, "k2000")["train"]["v2"]["all"] == 0.3
    with pytest.raises(
        report.ReportInputError, match=r"has no SSK run 'k500' \(runs found: GCD_base_prefix_gen, k2000"
    ):
        report.load_results(feats, "k500")


def test_a_run_folder_can_be_given_directly(tmp_path):
    run = report.ssk_run_dir(tmp_path / "ytf", "GCD_base_prefix_gen")
    write_results(run, 0.7)
    assert report.find_results(run) == run / report.RESULTS_FILE


def test_a_folder_without_results_names_what_was_looked_for(tmp_path):
    (tmp_path / "untrained").mkdir()
    with pytest.raises(report.ReportInputError) as exc:
        report.find_results(tmp_path / "untrained")
    message = str(exc.value)
    assert f"neither {tmp_path / 'untrained' / 'ssk'}/<run>/ssk_results.json" in message
    assert f"run SSK.py --save-dir {tmp_path} --experiment-idx untrained first" in message
