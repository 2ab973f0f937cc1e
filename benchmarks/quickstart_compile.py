"""Does ``torch.compile`` pay for itself within the quickstart? Compile time against the time it saves.

Times the quickstart's training step (``benchmarks.quickstart_profile``'s model and step: loader, forward, loss,
backward, clipping, AdamW) eagerly, then with the model's forward compiled (``torch.compile``, inductor): the first
compiled steps (compilation of forward and backward included) and the steady-state step afterwards. The break-even
step count is the compile overhead divided by the time a compiled step saves; it pays within the quickstart only if
that is below the recipe's steps.

Usage (from the repository root):
    python -m benchmarks.quickstart_compile --threads 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch

from benchmarks.common import add_common_args, save_results, setup
from benchmarks.quickstart_cost import NEW_RECIPE
from benchmarks.quickstart_profile import add_step_args, build_step
from data_loader.synthface import ensure_synthfaces


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthfaces_quick", help="synthfaces_quick root (generated if missing)")
    add_step_args(parser)
    parser.add_argument("--steps", type=int, default=4, help="timed steady-state steps of each mode (default: 4)")
    parser.add_argument("--compile-steps", type=int, default=2, help="first compiled steps timed (default: 2)")
    add_common_args(parser, device=False, output=False)
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    return parser


def _times(step, count: int) -> list[float]:
    """Wall seconds of ``count`` calls of ``step``."""
    out = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def main(args: argparse.Namespace) -> int:
    """Measure eager and compiled steps and print the break-even step count."""
    setup(args.threads, level=logging.WARNING)
    ensure_synthfaces(args.data, "synthfaces_quick")
    model, step, steps_per_epoch = build_step(args, label=False)
    _times(step, 1)
    eager = statistics.median(_times(step, args.steps))
    model.compile()
    first = _times(step, args.compile_steps)
    compiled = statistics.median(_times(step, args.steps))
    overhead = sum(first) - args.compile_steps * compiled
    saved = eager - compiled
    steps = NEW_RECIPE["epochs"] * steps_per_epoch
    break_even = overhead / saved if saved > 0 else float("inf")
    print(f"threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"eager step {eager:.3f} s; compiled step {compiled:.3f} s ({compiled / eager:.3f}x)")
    print(f"first {args.compile_steps} compiled steps {sum(first):.1f} s: compile overhead {overhead:.1f} s")
    print(f"break-even after {break_even:.0f} steps; the quickstart trains {steps}: ", end="")
    print("pays" if break_even < steps else "does not pay")
    payload = {
        "eager_seconds_per_step": eager,
        "compiled_seconds_per_step": compiled,
        "first_compiled_steps_seconds": first,
        "compile_overhead_seconds": overhead,
        "break_even_steps": break_even,
        "recipe_steps": steps,
        "threads": torch.get_num_threads(),
    }
    save_results(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
