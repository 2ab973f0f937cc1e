"""Where SSK.py keeps its outputs, and a side-by-side table of several SSK runs (``ssk_results.json``).

SSK outputs live with the features they were computed from: ``<save_dir>/<features folder>/ssk/<run>/``, where the
run is SSK.py's ``--experiment`` (``default`` when none is given). The table takes features folders (or SSK run
folders) and picks the run inside each one, e.g. the quickstart's baselines and model:

python -m utils.report results/quickstart/pixels results/quickstart/trained --names pixels trained
python -m utils.report results/ytf1000 results/casia1000 --run GCD_base_prefix_gen
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXTRACTION_MANIFEST = "extraction.json"  # written last by extract_features.py, beside features_{train,test}.pt
SSK_SUBDIR = "ssk"
DEFAULT_RUN = "default"
RESULTS_FILE = "ssk_results.json"
SPLITS = (("train", "v2 unlabelled train"), ("test", "v2 test"))


class ReportInputError(ValueError):
    """A folder that holds no SSK results, or several runs and no way to choose among them."""


def ssk_run_dir(features_dir: str | Path, run: str) -> Path:
    """The folder of SSK run ``run`` on the features in ``features_dir``: ``<features_dir>/ssk/<run>/``.

    Args:
        features_dir: the folder holding ``features_{train,test}.pt`` (``<save_dir>/<experiment_idx>``).
        run: the run name (SSK.py's ``--experiment``); one plain folder name.

    Returns:
        The run's output folder.
    """
    if run in ("", ".", "..") or Path(run).name != run or "\\" in run:
        raise ReportInputError(f"SSK run name {run!r} must be one plain folder name (no '/', not '.' or '..')")
    return Path(features_dir) / SSK_SUBDIR / run


def list_runs(features_dir: str | Path) -> list[str]:
    """Names of the SSK runs under ``<features_dir>/ssk/`` that have written ``ssk_results.json``, sorted."""
    root = Path(features_dir) / SSK_SUBDIR
    return sorted(p.parent.name for p in root.glob(f"*/{RESULTS_FILE}")) if root.is_dir() else []


def find_results(folder: str | Path, run: str | None = None) -> Path:
    """The ``ssk_results.json`` for ``folder``: a features folder (its ``ssk/<run>/``) or an SSK run folder.

    Args:
        folder: a features folder ``<save_dir>/<experiment_idx>`` or a run folder ``.../ssk/<run>``.
        run: the run to pick in a features folder; ``None`` accepts its only run and refuses to guess among several.

    Returns:
        The path of the results file.
    """
    folder = Path(folder)
    runs = list_runs(folder)
    if run is not None:
        path = ssk_run_dir(folder, run) / RESULTS_FILE
        if not path.is_file():
            found = ", ".join(runs) or "none"
            raise ReportInputError(f"{path} is missing: {folder} has no SSK run {run!r} (runs found: {found})")
        return path
    if len(runs) == 1:
        return ssk_run_dir(folder, runs[0]) / RESULTS_FILE
    if len(runs) > 1:
        raise ReportInputError(f"{folder} holds {len(runs)} SSK runs ({', '.join(runs)}); pick one with --run NAME")
    if (folder / RESULTS_FILE).is_file():
        return folder / RESULTS_FILE
    raise ReportInputError(
        f"no SSK results for {folder}: neither {folder / SSK_SUBDIR}/<run>/{RESULTS_FILE} nor {folder / RESULTS_FILE}"
        f" exists; run SSK.py --save-dir {folder.parent} --experiment-idx {folder.name} first"
    )


def load_results(folder: str | Path, run: str | None = None) -> dict:
    """``ssk_results.json`` of one features folder or SSK run folder (see :func:`find_results`)."""
    return json.loads(find_results(folder, run).read_text())


def format_table(rows: list[tuple[str, dict]], variant: str = "v2") -> str:
    """One line per run: All/Old/New of ``variant`` on the unlabelled train subset and on the test split."""

    def cell(value: float | None) -> str:
        return f"{100 * value:6.1f}" if value is not None else "   n/a"

    header = f"{'features':<22}" + "".join(f"| {title.replace('v2', variant):<22}" for _, title in SPLITS)
    sub = f"{'':<22}" + "| {:>6}{:>8}{:>8} ".format("All", "Old", "New") * len(SPLITS)
    lines = [header, sub, "-" * len(sub)]
    for name, results in rows:
        line = f"{name:<22}"
        for split, _ in SPLITS:
            acc = results[split][variant]
            line += f"| {cell(acc['all'])}  {cell(acc['old'])}  {cell(acc['new'])} "
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table for the folders given on the command line; a folder without usable results exits 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "folders", nargs="+", type=Path, help=f"features folders (their {SSK_SUBDIR}/<run>/ is read) or SSK run folders"
    )
    parser.add_argument("--names", nargs="+", default=None, help="row names (default: folder names)")
    parser.add_argument(
        "--run",
        default=None,
        help="SSK run (SSK.py --experiment) to read in every features folder (default: the folder's only run)",
    )
    parser.add_argument("--variant", default="v2", choices=("v1", "v2", "v2b"), help="metric variant (default: v2)")
    args = parser.parse_args(argv)
    names = args.names or [folder.name for folder in args.folders]
    if len(names) != len(args.folders):
        parser.error(f"--names has {len(names)} entries for {len(args.folders)} folders")
    try:
        rows = [(name, load_results(folder, args.run)) for name, folder in zip(names, args.folders)]
    except ReportInputError as err:
        parser.error(str(err))
    print(format_table(rows, args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
