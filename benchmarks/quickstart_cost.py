"""Training cost of the quickstart recipe against the previous one, in float32, on this machine.

Builds the real FaceGCD model and the real training loader of ``synthfaces_quick`` for each recipe, times
``--steps`` optimiser steps (data loading, forward, backward, AdamW; after ``--warmup`` steps) and reports seconds per
step, the steps the recipe trains, the estimated training time and the ratio of the current recipe's training cost
to the previous one's. Both are measured in the same run, so the ratio holds on a loaded or a different machine.

Usage (from the repository root):
    python -m benchmarks.quickstart_cost --threads 2
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

from benchmarks.common import add_common_args, save_results, setup
from data_loader import build_gcd_datasets
from data_loader.synthface import ensure_synthfaces
from model import ModelConfig, build_facegcd
from trainer.precision import cpu_has_native_bf16

# The quickstart recipes (shell/quickstart.sh): the one before fp32 everywhere, and the current one.
RECIPES = {
    "previous": dict(img_size=64, hypernet_hidden_dim=1024, epochs=32),
    "current": dict(img_size=48, hypernet_hidden_dim=256, epochs=28),
}
COMMON = dict(arch="vit_tiny", patch_size=16, prefix_length=4, head_out_dim=2048, grad_from_block=0)
BATCH = 64


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthfaces_quick", help="synthfaces_quick root (generated if missing)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per recipe (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    add_common_args(parser, device=False, output=False)
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    return parser


def time_recipe(recipe: dict, args: argparse.Namespace) -> dict:
    """Median wall seconds of one fp32 training step of ``recipe`` and its estimated training time."""
    size = recipe["img_size"]
    datasets = build_gcd_datasets("synthfaces_quick", args.data, image_size=size)
    config = ModelConfig(img_size=size, hypernet_hidden_dim=recipe["hypernet_hidden_dim"], **COMMON)
    torch.manual_seed(0)
    model = build_facegcd(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(datasets.train, batch_size=BATCH, shuffle=True, drop_last=True, generator=generator)
    batches = iter(loader)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        views, labels, _, is_labelled = next(batches)
        loss = model(torch.cat(views), labels, is_labelled.bool())["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times[args.warmup :])
    steps = len(loader) * recipe["epochs"]
    return {**recipe, "seconds_per_step": per_step, "steps": steps, "training_seconds": per_step * steps}


def main(args: argparse.Namespace) -> int:
    """Time both recipes and print the ratio."""
    setup(args.threads, level=logging.WARNING)
    ensure_synthfaces(args.data, "synthfaces_quick")
    results = {name: time_recipe(recipe, args) for name, recipe in RECIPES.items()}
    ratio = results["current"]["training_seconds"] / results["previous"]["training_seconds"]
    print(
        f"fp32, threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16 {cpu_has_native_bf16()}, torch {torch.__version__}"
    )
    print(f"{'recipe':<10}{'px':>4}{'hidden':>8}{'epochs':>8}{'steps':>7}{'s/step':>9}{'training s':>12}")
    for name, r in results.items():
        print(
            f"{name:<10}{r['img_size']:>4}{r['hypernet_hidden_dim']:>8}{r['epochs']:>8}{r['steps']:>7}"
            f"{r['seconds_per_step']:>9.3f}{r['training_seconds']:>12.0f}"
        )
    print(f"training cost current / previous: {ratio:.3f}")
    payload = {
        "results": results,
        "ratio": ratio,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    save_results(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
