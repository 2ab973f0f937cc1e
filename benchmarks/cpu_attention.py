"""CPU training kernels of `PrefixAttention`: explicit product-softmax-product vs PyTorch's fused attention.

Times forward + backward of one prefixed attention layer (median of --reps after 2 warm-up runs) with each kernel,
in float32 and under bfloat16 autocast, for a range of token counts, and prints explicit/fused time ratios: the
measurement behind `PrefixAttention.cpu_training_kernel = "auto"`.

Usage (from the repository root):
    python -m benchmarks.cpu_attention --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import add_common_args, setup
from model import PrefixAttention

WIDTHS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["vit_tiny", "vit_small"], choices=sorted(WIDTHS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[17, 50, 101, 197], help="tokens T per image")
    parser.add_argument("--prefix-length", type=int, default=10, help="prefix length P (default: 10)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per call (default: 64)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (default: 5)")
    add_common_args(parser, device=False, output=False)
    return parser


def time_kernel(kernel: str, dim: int, heads: int, args: argparse.Namespace, tokens: int, bf16: bool) -> float:
    """Median seconds of forward + backward of one prefixed attention layer with `kernel`."""
    PrefixAttention.cpu_training_kernel = kernel
    gen = torch.Generator().manual_seed(0)
    layer = PrefixAttention(dim, num_heads=heads, qkv_bias=True).train()
    x = torch.randn(args.batch, tokens, dim, generator=gen, requires_grad=True)
    prefix = torch.randn(2, args.batch, heads, args.prefix_length, dim // heads, generator=gen, requires_grad=True)
    times = []
    for _ in range(args.reps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = layer(x, prefix=prefix)
        out.float().square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main(args: argparse.Namespace) -> int:
    """Print one line per (arch, tokens, precision): both times and their ratio."""
    setup(args.threads)
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, P {args.prefix_length}, torch {torch.__version__}")
    print(f"{'arch':<10}{'T':>5}  {'precision':<9}{'explicit ms':>13}{'fused ms':>10}{'ratio':>8}")
    for arch in args.arch:
        dim, heads = WIDTHS[arch]
        for tokens in args.tokens:
            for bf16 in (False, True):
                explicit = time_kernel("explicit", dim, heads, args, tokens, bf16)
                fused = time_kernel("fused", dim, heads, args, tokens, bf16)
                precision = "bf16" if bf16 else "fp32"
                print(
                    f"{arch:<10}{tokens:>5}  {precision:<9}{explicit * 1e3:>13.2f}{fused * 1e3:>10.2f}"
                    f"{explicit / fused:>8.2f}",
                    flush=True,
                )
    PrefixAttention.cpu_training_kernel = "auto"
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
