"""Assignment accuracy of a ``discover.py`` report whose photos are named ``id<k>_<n>.<ext>`` (the demo's and the
tests' SynthFaces folders): Hungarian accuracy over the photo faces, the share of gallery identities' faces named
after their gallery person and the share of the other identities' faces put in new clusters.

    python -m photos.demo_score REPORT --gallery-ids 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from utils.evaluation.clustering import cluster_acc


def score(report: Path, gallery_ids: set[int], gallery_name: str = "id_{:04d}") -> dict[str, float]:
    """The three measures of a report (see the module docstring)."""
    with open(report / "assignments.csv", newline="") as f:
        faces = [r for r in csv.DictReader(f) if r["role"] == "photo"]
    truth = [int(Path(r["photo"]).name.split("_")[0][2:]) for r in faces]
    people = sorted({r["person"] for r in faces})
    known = [(r, k) for r, k in zip(faces, truth) if k in gallery_ids]
    new = [(r, k) for r, k in zip(faces, truth) if k not in gallery_ids]
    return {
        "faces": len(faces),
        "accuracy": cluster_acc(truth, [people.index(r["person"]) for r in faces]),
        "known_named": sum(r["person"] == gallery_name.format(k) for r, k in known) / max(1, len(known)),
        "new_kept_apart": sum(r["person"].startswith("new_") for r, _ in new) / max(1, len(new)),
        "people_found": len(people),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--gallery-ids", type=int, nargs="+", required=True)
    args = parser.parse_args(argv)
    result = score(args.report, set(args.gallery_ids))
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
