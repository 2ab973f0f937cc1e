"""Training cost of the quickstart: the old code and recipe against the new, natively and with AVX2 forced.

Times the quickstart's float32 training step (``benchmarks/quickstart_worker.py``: data loading, forward, loss,
backward, gradient clipping, the optimiser of ``create_optimizer``) in two source trees: this checkout ("new") and the
commit before the speed-up, ``--old-commit`` ("old"), whose files ``git archive`` writes to a temporary folder (read
only; nothing in the checkout changes). Each measurement is a subprocess with that tree first on ``PYTHONPATH``, once
natively and once with the AVX2 code paths forced (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``); the runs are interleaved for ``--rounds`` rounds and each reports the median step
time over its rounds (and the fastest step, the least disturbed one where other work shares the CPU).

Both trees run the same model, seed and batches, so they must compute the same losses and gradients: the first
step's loss and gradient norm and the losses of every step must agree to ``--rtol`` (float rounding of reordered
sums; the optimiser's fused kernel rounds differently) or the benchmark fails.

The table gives seconds per step and the training seconds of each recipe (steps x seconds per step): the old recipe
(`OLD_RECIPE`) on the old code against the current recipe (`NEW_RECIPE`, ``shell/quickstart.sh``; timed in a third
interleaved run when its step differs) on the new code.

Usage (from the repository root; needs git and the old commit in the repository):
    python -m benchmarks.quickstart_cost --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import add_common_args, save_results, setup
from data_loader.synthface import ensure_synthfaces

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "benchmarks" / "quickstart_worker.py"
OLD_COMMIT = "fd58e3c"  # the quickstart before the step was profiled and sped up
# The quickstart's model before the recipe changed (12 blocks); the new recipe makes it shallower (``depth``).
MODEL = dict(
    arch="vit_tiny",
    patch_size=16,
    img_size=48,
    prefix_length=4,
    hypernet_hidden_dim=256,
    head_out_dim=2048,
    grad_from_block=0,
)
# The quickstart's recipe before the speed-up and now (shell/quickstart.sh): 6 blocks instead of 12 kept the trained
# row's margin over raw pixels over 3 seeds (docs/performance.md). A recipe may override the model's fields
# (``depth``); the new recipe is timed in a run of its own.
OLD_RECIPE = dict(epochs=28, lr=2e-4, batch=64)
NEW_RECIPE = dict(epochs=28, lr=2e-4, batch=64, depth=6)
STEP = dict(weight_decay=0.05, clip=1.0)
# The timed runs: (name, source tree, recipe). "old" and "new" time the same step (the old recipe's) in both trees
# and must agree; "new recipe" is the new tree at the new recipe, when that differs.
RUNS = (("old", "old", OLD_RECIPE), ("new", "new", OLD_RECIPE)) + (
    (("new recipe", "new", NEW_RECIPE),) if NEW_RECIPE != OLD_RECIPE else ()
)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
DISPATCHES = ("native", "avx2")


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthfaces_quick", help="synthfaces_quick root (generated if missing)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (default: 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, >= 1 (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the runs (default: 3)")
    parser.add_argument("--old-commit", default=OLD_COMMIT, help=f"the old code (default: {OLD_COMMIT})")
    parser.add_argument(
        "--dispatch", nargs="+", choices=DISPATCHES, default=list(DISPATCHES), help="code paths (default: both)"
    )
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative agreement of old and new (default: 1e-4)")
    add_common_args(parser, device=False, threads_default=2, output=False)
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    return parser


def export_tree(commit: str, folder: Path) -> Path:
    """Write the files of ``commit`` to ``folder`` with ``git archive`` (reads the repository only)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def recipe_model(recipe: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of ``recipe``: `MODEL` with the recipe's overrides (only the fields it names, so the
    old tree, whose ModelConfig lacks newer fields, builds the old recipe)."""
    return dict(MODEL, **{k: recipe[k] for k in ("depth",) if k in recipe})


def run_worker(tree: Path, recipe: dict[str, Any], dispatch: str, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run of the step of ``recipe`` in ``tree`` with the code path ``dispatch``."""
    env = {k: v for k, v in os.environ.items() if k not in AVX2_ENV}
    env.update(AVX2_ENV if dispatch == "avx2" else {})
    env["PYTHONPATH"] = str(tree)
    settings = dict(
        STEP,
        model=recipe_model(recipe),
        lr=recipe["lr"],
        batch=recipe["batch"],
        data=str(Path(args.data).resolve()),
        threads=args.threads,
        steps=args.steps,
        warmup=args.warmup,
    )
    done = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(settings)], env=env, cwd=tree, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"timing run in {tree} ({dispatch}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["source"]) != tree.resolve():
        raise RuntimeError(f"the timing run for {tree} imported the code of {result['source']}")
    return result


def max_relative_difference(a: list[float], b: list[float]) -> float:
    """Largest |a - b| / max(|a|, |b|) over paired values."""
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def measure(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Interleaved `RUNS` for every code path; per run the median step time and the first round's values."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for dispatch in args.dispatch:
            for name, code, recipe in RUNS:
                runs.setdefault(f"{name}/{dispatch}", []).append(run_worker(trees[code], recipe, dispatch, args))
    results = {}
    for key, key_runs in runs.items():
        times = [t for run in key_runs for t in run["times"]]
        first = key_runs[0]
        results[key] = {
            "seconds_per_step": statistics.median(times),
            "fastest_step": min(times),
            "step_times": times,
            "losses": first["losses"],
            "grad_norm": first["grad_norm"],
            "cpu_capability": first["cpu_capability"],
            "threads": first["threads"],
            "steps_per_epoch": first["steps_per_epoch"],
        }
    return results


def agreement(results: dict[str, dict[str, Any]], dispatches: list[str]) -> dict[str, float]:
    """Largest relative difference of old and new, per code path, over the losses and the first gradient norm."""
    out = {}
    for dispatch in dispatches:
        old, new = results[f"old/{dispatch}"], results[f"new/{dispatch}"]
        out[dispatch] = max(
            max_relative_difference(old["losses"], new["losses"]),
            max_relative_difference([old["grad_norm"]], [new["grad_norm"]]),
        )
    return out


def main(args: argparse.Namespace) -> int:
    """Time old and new code, check that they agree and print the table."""
    setup(args.threads, level=logging.WARNING)
    ensure_synthfaces(args.data, "synthfaces_quick")
    with tempfile.TemporaryDirectory(prefix="quickstart_old_") as folder:
        trees = {"old": export_tree(args.old_commit, Path(folder)), "new": ROOT}
        results = measure(trees, args)
    differences = agreement(results, args.dispatch)
    print(f"float32, {args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"old code: {args.old_commit}; new code: this checkout; medians of {args.rounds} interleaved rounds")
    print(
        f"step of batch {OLD_RECIPE['batch']}: old and new code; new recipe: batch {NEW_RECIPE['batch']}, "
        f"{recipe_model(NEW_RECIPE).get('depth', 12)} blocks, new code"
    )
    header = f"{'code path':<12}{'capability':>11}{'old s/step':>12}{'new s/step':>12}{'new/old':>9}"
    header += f"{'fastest new/old':>17}{'max rel diff':>14}{'new recipe s/step':>19}"
    print(header + f"{'old recipe s':>14}{'new recipe s':>14}{'ratio':>8}")
    rows = {}
    for dispatch in args.dispatch:
        old, new = results[f"old/{dispatch}"], results[f"new/{dispatch}"]
        recipe = results.get(f"new recipe/{dispatch}", new)
        old_steps = old["steps_per_epoch"] * OLD_RECIPE["epochs"]
        new_steps = recipe["steps_per_epoch"] * NEW_RECIPE["epochs"]
        old_total = old["seconds_per_step"] * old_steps
        new_total = recipe["seconds_per_step"] * new_steps
        rows[dispatch] = {
            "step_ratio": new["seconds_per_step"] / old["seconds_per_step"],
            "old_recipe_seconds": old_total,
            "new_recipe_seconds": new_total,
            "recipe_ratio": new_total / old_total,
            "fastest_step_ratio": new["fastest_step"] / old["fastest_step"],
            "max_relative_difference": differences[dispatch],
        }
        print(
            f"{dispatch:<12}{new['cpu_capability']:>11}{old['seconds_per_step']:>12.3f}{new['seconds_per_step']:>12.3f}"
            f"{rows[dispatch]['step_ratio']:>9.3f}{rows[dispatch]['fastest_step_ratio']:>17.3f}"
            f"{differences[dispatch]:>14.2e}{recipe['seconds_per_step']:>19.3f}"
            f"{old_total:>14.0f}{new_total:>14.0f}{rows[dispatch]['recipe_ratio']:>8.3f}"
        )
    print(
        f"old recipe: {OLD_RECIPE['epochs']} epochs of batch {OLD_RECIPE['batch']} ({old_steps} steps); new recipe: "
        f"{NEW_RECIPE['epochs']} epochs of batch {NEW_RECIPE['batch']} ({new_steps} steps) with "
        f"{recipe_model(NEW_RECIPE).get('depth', 12)} blocks"
    )
    payload = {
        "results": results,
        "summary": rows,
        "old_commit": args.old_commit,
        "model": {"old": recipe_model(OLD_RECIPE), "new": recipe_model(NEW_RECIPE)},
        "old_recipe": OLD_RECIPE,
        "new_recipe": NEW_RECIPE,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    save_results(payload, args.out)
    bad = {d: v for d, v in differences.items() if not v <= args.rtol}
    if bad:
        print(f"FAIL: old and new code disagree beyond rtol {args.rtol}: {bad}")
        return 1
    print(f"old and new code agree to rtol {args.rtol}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
