"""Cost of FaceGCD's prefixes: training-step time and peak memory of the prefix model vs. the plain GCD baseline.

Both variants train the same blocks (>= --grad-from-block), the same DINO head and see the same batch; the baseline
has no prefix generator and no conditioning pass (prefix_length 0). A step is zero_grad + forward + GCD loss +
backward + Nesterov-SGD step. Times are the median of --steps timed steps after --warmup steps (CUDA synchronised).

Memory, per variant, measured on one extra step after the timed ones:
- CUDA: `torch.cuda.max_memory_allocated` over the step (parameters, buffers, optimiser state, gradients,
  activations and temporaries: everything the caching allocator hands out).
- CPU: static bytes (parameters, buffers and optimiser state, counted exactly) + the peak of bytes allocated above
  that during the step, from the CPU allocator events recorded by `torch.profiler` (`profile_memory=True`): the
  running sum of every allocation and free in the step, maximised over time. This covers gradients, saved
  activations (also inside checkpointed blocks) and temporaries, like the CUDA figure.

Usage (from the repository root):
    python -m benchmarks.prefix_overhead --arch vit_small --patch 8 --img 112 --batch 32 --output overhead.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
from typing import Any, Callable

import numpy as np
import timm
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import add_common_args, cli_main, resolve_device, save_results, setup, synchronize, timed
from model import FaceGCD, ModelConfig, PrefixAttention, build_facegcd
from trainer.precision import enable_cuda_tf32

logger = logging.getLogger(__name__)

TARGETS = {"time": 1.6, "memory": 1.5}
AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vit_small", help="backbone (default: vit_small)")
    parser.add_argument("--patch", type=int, default=8, help="patch size (default: 8)")
    parser.add_argument("--img", type=int, default=112, help="image size (default: 112)")
    parser.add_argument("--batch", type=int, default=32, help="samples per step B; 2B views are run (default: 32)")
    parser.add_argument("--prefix-length", type=int, default=10, help="P of the prefix model (default: 10)")
    parser.add_argument("--layer-embed", action="store_true", help="layer-embed HyperNets (default: off)")
    parser.add_argument("--grad-from-block", type=int, default=11, help="first trained block (default: 11)")
    parser.add_argument("--head-out-dim", type=int, default=65536, help="DINO head width (default: 65536)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default: 3)")
    parser.add_argument(
        "--grad-checkpointing",
        choices=("off", "on", "both"),
        default="both",
        help="prefix model with checkpointing off, on, or both as two variants (default: both)",
    )
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype (default: none)")
    parser.add_argument(
        "--cpu-attention",
        choices=("auto", "explicit", "fused"),
        default="auto",
        help="attention kernel for CPU training (default: auto, see "
        "model.prefix_attention.PrefixAttention.cpu_training_kernel)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    add_common_args(parser)
    return parser


def _versions(device: torch.device) -> dict[str, Any]:
    """Library versions and the device description."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
    }


def _static_bytes(model: FaceGCD, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers and optimiser state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak CPU bytes allocated above the starting point while running `step` (profiler allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    running, peak = 0, 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def run_variant(
    name: str,
    cfg: ModelConfig,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
    *,
    grad_checkpointing: bool = False,
) -> dict[str, Any]:
    """Time and measure training steps of one model variant.

    Args:
        name: Variant name for the log.
        cfg: Model configuration.
        batch: (images (2B, 3, S, S), labels (B,), labelled mask (B,)) on `device`.
        args: Benchmark arguments.
        device: Device.
        grad_checkpointing: Per-block activation checkpointing.

    Returns:
        Timings (ms), memory (bytes) and parameter counts.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()  # release the previous variant's cached blocks
    torch.manual_seed(args.seed)
    model = build_facegcd(cfg).to(device)
    model.set_grad_checkpointing(grad_checkpointing)
    model.train()
    optimizer = torch.optim.SGD(model.get_params_groups(2e-5), lr=0.1, momentum=0.9, nesterov=True)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    images, labels, labelled = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(images, labels, labelled)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    times = [timed(step, device)[1] * 1000.0 for _ in range(args.steps)]

    static = _static_bytes(model, optimizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = static + _cpu_step_peak_bytes(step)
    result = {
        "time_ms": {"median": statistics.median(times), "mean": statistics.fmean(times), "min": min(times)},
        "times_ms": times,
        "peak_memory_bytes": peak,
        "static_bytes": static,
        "step_bytes_above_static": peak - static,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "grad_checkpointing": grad_checkpointing,
    }
    logger.info(
        "%-14s median %8.1f ms  peak %8.1f MiB (static %7.1f MiB)",
        name,
        result["time_ms"]["median"],
        peak / 2**20,
        static / 2**20,
    )
    return result


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print the JSON results.

    Args:
        args: Parsed arguments.

    Returns:
        Exit status.
    """
    setup(args.threads)
    logging.getLogger("model.facegcd").setLevel(logging.ERROR)  # the random-init warning is expected here
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise ValueError("--steps must be >= 1, --warmup >= 0 and --batch >= 1")
    if args.prefix_length < 1:
        raise ValueError(f"--prefix-length must be >= 1 for the prefix model, got {args.prefix_length}")
    device = resolve_device(args.device)
    if args.amp == "float16" and device.type != "cuda":
        raise ValueError("--amp float16 needs CUDA; use bfloat16 on CPU")
    PrefixAttention.cpu_training_kernel = args.cpu_attention
    if device.type == "cuda":
        enable_cuda_tf32()

    base = dict(
        arch=args.arch,
        patch_size=args.patch,
        img_size=args.img,
        layer_embed=args.layer_embed,
        head_out_dim=args.head_out_dim,
        grad_from_block=args.grad_from_block,
        seed=args.seed,
    )
    prefix_cfg = ModelConfig(prefix_length=args.prefix_length, **base)
    baseline_cfg = ModelConfig(prefix_length=0, **base)

    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(2 * args.batch, 3, args.img, args.img, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    labelled = (torch.arange(args.batch) % 2 == 0).to(device)
    batch = (images, labels, labelled)

    results = {"baseline": run_variant("baseline (P=0)", baseline_cfg, batch, args, device)}
    if args.grad_checkpointing in ("off", "both"):
        results["prefix"] = run_variant(f"prefix (P={args.prefix_length})", prefix_cfg, batch, args, device)
    if args.grad_checkpointing in ("on", "both"):
        results["prefix_ckpt"] = run_variant("prefix + ckpt", prefix_cfg, batch, args, device, grad_checkpointing=True)

    base_time = results["baseline"]["time_ms"]["median"]
    base_mem = results["baseline"]["peak_memory_bytes"]
    ratios = {}
    for name in results.keys() - {"baseline"}:
        time_ratio = results[name]["time_ms"]["median"] / base_time
        mem_ratio = results[name]["peak_memory_bytes"] / base_mem
        ratios[name] = {
            "time": time_ratio,
            "memory": mem_ratio,
            "meets_targets": time_ratio <= TARGETS["time"] and mem_ratio <= TARGETS["memory"],
        }
        logger.info("%s / baseline: time x%.2f, peak memory x%.2f", name, time_ratio, mem_ratio)
    report = {
        "config": vars(args),
        "versions": _versions(device),
        "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "static + profiler step peak",
        "results": results,
        "ratios_vs_baseline": ratios,
        "targets": TARGETS,
    }
    print(save_results(report, args.output, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(get_args_parser(), main, errors=(ValueError,)))
