"""Mean and spread over seeds of SS-k-means results: one row per arm, each arm a list of features folders (one per
seed) whose ``ssk_results.json`` (``SSK.py``) is read.

    python -m benchmarks.claim_table --row facegcd results/claim/facegcd_s0 results/claim/facegcd_s1 \
        --row "raw pixels" results/claim/pixels

Prints a Markdown table of v2 (or ``--variant``) All/Old/New on the unlabelled training images (D_U) and on the test
split, in percent, as ``mean ± sample std`` over the arm's folders (``n = 1`` shows the value alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from utils.report import SPLITS, ReportInputError, load_results

METRICS = ("all", "old", "new")


def summarise(values: list[float]) -> str:
    """``mean ± std`` in percent of fractions in [0, 1] (sample std over seeds), or the single value.

    Args:
        values: one accuracy per seed.

    Returns:
        The cell text.
    """
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def arm_cells(folders: list[Path], variant: str) -> list[str]:
    """The six cells (D_U then test; All, Old, New) of one arm.

    Args:
        folders: features folders of the arm's seeds.
        variant: metric variant (``v1``, ``v2``, ``v2b``).

    Returns:
        Cell texts.
    """
    results = [load_results(folder) for folder in folders]
    return [summarise([r[split][variant][m] for r in results]) for split, _ in SPLITS for m in METRICS]


def format_markdown(rows: list[tuple[str, int, list[str]]], variant: str) -> str:
    """A Markdown table: arm, seeds, then the six cells.

    Args:
        rows: (name, number of seeds, cells).
        variant: metric variant, for the header.

    Returns:
        The table.
    """
    header = ["arm", "seeds"] + [f"{variant} {m} ({where})" for where in ("D_U", "test") for m in ("All", "Old", "New")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([name, str(n), *cells]) + " |" for name, n, cells in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table; a folder without results exits 2 naming it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--row",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME_THEN_FOLDERS",
        help="an arm's name, then its features folders (one per seed)",
    )
    parser.add_argument("--variant", default="v2", choices=("v1", "v2", "v2b"), help="metric variant (default: v2)")
    args = parser.parse_args(argv)
    rows = []
    for name, *folders in args.row:
        if not folders:
            parser.error(f"--row {name!r} names no features folder")
        try:
            rows.append((name, len(folders), arm_cells([Path(f) for f in folders], args.variant)))
        except ReportInputError as err:
            parser.error(str(err))
    print(format_markdown(rows, args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
