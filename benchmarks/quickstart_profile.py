"""Where the time of one quickstart training step goes: a torch.profiler breakdown and the arithmetic it needs.

Builds the quickstart's FaceGCD model (``shell/quickstart.sh``: ViT-T/16 at 48 px, prefix length 4, HyperNets 256
wide, a 2048-wide DINO head, batch 64) and its real training loader, runs ``--warmup`` untimed steps and profiles
``--steps`` steps exactly as the training loop does them (loader, forward, loss, backward, gradient clipping at 1.0,
AdamW from ``create_optimizer``). Every operator, forward or backward, is charged to the part of the step it belongs
to: a forward operator to the innermost part it runs in, a backward operator to the part that ran its forward
operator (the profiler links the two by their autograd sequence number). The arithmetic of a step is counted with
``torch.utils.flop_counter`` (matrix products only) and set against the step time.

``--dispatch native avx2`` repeats the measurement in subprocesses with the AVX2 code paths forced
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``), so a CPU with AVX-512 shows the
breakdown of a CPU without it.

Usage (from the repository root):
    python -m benchmarks.quickstart_profile --threads 2 --dispatch native avx2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import add_common_args, save_results, setup
from benchmarks.quickstart_cost import NEW_RECIPE, recipe_model
from data_loader import build_gcd_datasets
from data_loader.synthface import ensure_synthfaces
from model import ModelConfig, build_facegcd
from trainer.optim import create_optimizer

BATCH = 64  # the quickstart's batch
LR, WEIGHT_DECAY, CLIP = 2e-4, 0.05, 1.0
# Environment that makes ATen, oneDNN and MKL take their AVX2 code paths on a CPU with AVX-512.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PART_PREFIX = "part:"
# Parts of a step, in the order of the table.
PARTS = (
    "data loading",
    "token embedding",
    "conditioning pass",
    "HyperNetworks + prompt MLP",
    "prefixed pass: linear layers",
    "prefixed pass: attention core",
    "prefixed pass: norms, GELU, adds",
    "DINO head",
    "loss and glue",
    "gradient clipping",
    "optimiser step",
    "zero_grad",
    "other",
)


def add_step_args(parser: argparse.ArgumentParser) -> None:
    """The step's flags (`build_step`): ``--batch`` and ``--depth``."""
    parser.add_argument("--batch", type=int, default=BATCH, help=f"images per step, two views each (default: {BATCH})")
    parser.add_argument(
        "--depth",
        type=int,
        default=recipe_model(NEW_RECIPE)["depth"],
        help="ViT blocks (default: the quickstart's, %(default)s; docs/performance.md's breakdown used 12)",
    )


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the profile."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthfaces_quick", help="synthfaces_quick root (generated if missing)")
    add_step_args(parser)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument(
        "--dispatch",
        nargs="+",
        choices=("native", "avx2"),
        default=None,
        help="run once per code path, each in a subprocess (default: this process as it is)",
    )
    add_common_args(parser, device=False, output=False)
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    return parser


@contextmanager
def part(name: str) -> Iterator[None]:
    """Label what runs inside as one part of the step (a profiler range)."""
    with record_function(PART_PREFIX + name):
        yield


def _label_module(module: torch.nn.Module, name: str) -> None:
    """Open a profiler range named ``name`` around every forward call of ``module``."""
    ranges: list[Any] = []

    def enter(*_: Any) -> None:
        ranges.append(record_function(PART_PREFIX + name))
        ranges[-1].__enter__()

    def leave(*_: Any) -> None:
        ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def build_step(args: argparse.Namespace, *, label: bool = True):
    """The quickstart model, a function running one training step and the steps of an epoch.

    Args:
        args: the parsed flags (``data``, ``batch``, ``depth``).
        label: open a profiler range around each part of the step (see `PARTS`).

    Returns:
        (model, step, steps per epoch).
    """
    config = dict(recipe_model(NEW_RECIPE), depth=args.depth)
    datasets = build_gcd_datasets("synthfaces_quick", args.data, image_size=config["img_size"])
    torch.manual_seed(0)
    model = build_facegcd(ModelConfig(**config)).train()
    optimizer = create_optimizer(model.get_params_groups(WEIGHT_DECAY), opt="adamw", lr=LR, weight_decay=WEIGHT_DECAY)
    loader = DataLoader(
        datasets.train, batch_size=args.batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    batches = iter(loader)
    if label:
        _label_parts(model)

    def step() -> torch.Tensor:
        with part("data loading"):
            inputs = model.batch_inputs(next(batches), torch.device("cpu"))
        with part("loss and glue"):  # what the labelled modules inside do not claim: the GCD loss, CLS pick
            loss = model(*inputs)["loss"]
        loss.backward()
        with part("gradient clipping"):
            model.clip_gradients(CLIP)
        with part("optimiser step"):
            optimizer.step()
        with part("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step, len(loader)


def _label_parts(model: torch.nn.Module) -> None:
    """Label the forward of every part of the model (see `PARTS`)."""
    for block in model.backbone.blocks:
        _label_module(block, "prefixed pass: norms, GELU, adds")
        _label_module(block.attn, "prefixed pass: attention core")
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            _label_module(linear, "prefixed pass: linear layers")
    _label_module(model.backbone.norm, "prefixed pass: norms, GELU, adds")
    _label_module(model.conditioner, "conditioning pass")
    _label_module(model.backbone.prefix_generator, "HyperNetworks + prompt MLP")
    _label_module(model.projection_head, "DINO head")
    _label_module(model.backbone.patch_embed, "token embedding")


def _innermost_part(event: Any) -> str | None:
    """The innermost labelled part enclosing a profiler event, or None."""
    while event is not None:
        if event.name.startswith(PART_PREFIX):
            return event.name[len(PART_PREFIX) :]
        event = event.cpu_parent
    return None


def breakdown(prof: Any, steps: int) -> dict[str, float]:
    """Self CPU seconds per step of every part, backward operators charged to their forward operator's part."""
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    forward_part: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            label = _innermost_part(event)
            if label is not None:
                forward_part.setdefault(event.sequence_nr, label)
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith(PART_PREFIX):
            continue
        label = None
        node = event
        while node is not None and label is None:  # a backward op: the part of its forward op
            if node.name.startswith("autograd::engine::evaluate_function") and node.sequence_nr >= 0:
                label = forward_part.get(node.sequence_nr, "other")
            node = node.cpu_parent
        label = label or _innermost_part(event) or "other"
        totals[label] += event.self_cpu_time_total / 1e6 / steps
    return dict(totals)


def step_flops(step) -> float:
    """Floating-point operations of one step's matrix products (forward and backward), per torch's counter."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Profile the step in this process and return the breakdown, step time and arithmetic rate."""
    _, step, _ = build_step(args)
    for _ in range(args.warmup):
        step()
    flops = step_flops(step)
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    plain = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
    parts = breakdown(prof, args.steps)
    seconds = sorted(plain)[len(plain) // 2]
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "seconds_per_step": seconds,
        "seconds_per_step_profiled": sorted(times)[len(times) // 2],
        "gflop_per_step": flops / 1e9,
        "gflop_per_second": flops / 1e9 / seconds,
        "parts": {name: parts.get(name, 0.0) for name in PARTS},
    }


def print_table(result: dict[str, Any], label: str) -> None:
    """The breakdown as a table: seconds per step and share of the profiled operator time."""
    parts = result["parts"]
    total = sum(parts.values())
    print(
        f"\n{label}: CPU capability {result['cpu_capability']}, {result['threads']} threads; step "
        f"{result['seconds_per_step']:.3f} s ({result['seconds_per_step_profiled']:.3f} s profiled); "
        f"{result['gflop_per_step']:.1f} GFLOP of matrix products -> {result['gflop_per_second']:.1f} GFLOP/s"
    )
    print(f"{'part of the step':<34}{'s/step':>8}{'share':>8}")
    for name, seconds in parts.items():
        print(f"{name:<34}{seconds:>8.3f}{100 * seconds / total:>7.1f}%")
    print(f"{'total operator time':<34}{total:>8.3f}")


def run_dispatches(args: argparse.Namespace) -> dict[str, Any]:
    """Run the profile once per requested code path in a subprocess and collect the results."""
    results = {}
    for dispatch in args.dispatch:
        env = dict(os.environ, **(AVX2_ENV if dispatch == "avx2" else {}))
        if dispatch == "native":
            for name in AVX2_ENV:
                env.pop(name, None)
        command = [sys.executable, "-m", "benchmarks.quickstart_profile", "--data", args.data]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--out", "-"]
        if args.threads is not None:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        results[dispatch] = json.loads(done.stdout.strip().splitlines()[-1])
        print_table(results[dispatch], dispatch)
    return results


def main(args: argparse.Namespace) -> int:
    """Profile the quickstart step and print the breakdown."""
    setup(args.threads, level=logging.WARNING)
    ensure_synthfaces(args.data, "synthfaces_quick")
    if args.dispatch:
        payload: dict[str, Any] = run_dispatches(args)
    else:
        payload = measure(args)
        if args.out == "-":  # a subprocess of --dispatch: the result on the last line
            print(json.dumps(payload))
            return 0
        print_table(payload, "this process")
    payload = {"results": payload, "torch": torch.__version__}
    save_results(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
