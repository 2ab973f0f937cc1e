"""Side-by-side table of several SSK runs (``ssk_results.json``), e.g. the quickstart's model and baselines.

python -m utils.report results/quickstart/pixels results/quickstart/trained --names pixels trained
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPLITS = (("train", "v2 unlabelled train"), ("test", "v2 test"))


def load_results(folder: Path) -> dict:
    """``ssk_results.json`` of one SSK output folder."""
    path = Path(folder) / "ssk_results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run SSK.py with --save_dir/--experiment pointing there")
    return json.loads(path.read_text())


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
    """Print the table for the folders given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="SSK output folders")
    parser.add_argument("--names", nargs="+", default=None, help="row names (default: folder names)")
    parser.add_argument("--variant", default="v2", choices=("v1", "v2", "v2b"), help="metric variant (default: v2)")
    args = parser.parse_args(argv)
    names = args.names or [folder.name for folder in args.folders]
    if len(names) != len(args.folders):
        parser.error(f"--names has {len(names)} entries for {len(args.folders)} folders")
    rows = [(name, load_results(folder)) for name, folder in zip(names, args.folders)]
    print(format_table(rows, args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
