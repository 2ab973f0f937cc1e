"""Peak memory per rank of a recognition checkpoint: Partial FC centres and their SGD momentum gathered for saving.

``--world-size`` processes (torch.multiprocessing, gloo on the CPU) each build a ``FaceRecognizer`` whose Partial FC
holds its contiguous block of ``--classes`` centres of size ``--dim`` (the backbone is a ViT-T/16 at 32 px, a few MiB,
so the centres dominate). One SGD step (momentum 0.9) on a zero gradient of the centres gives them a momentum buffer
of the same size; the gradient is then freed. Each rank then calls what the training loop calls every epoch on every
rank, ``checkpoint_state_dict()`` and ``optimizer_state_dict(optimizer)``, and keeps both results alive, as the loop
does until rank 0 has saved them.

Memory: torch's CPU tensors live in malloc / mmap memory that the resident set size (RSS) counts once written, while
tracemalloc does not see them. Just before the two calls each rank resets Linux's peak RSS (``VmHWM``) by writing 5 to
``/proc/self/clear_refs`` and reads its RSS (``VmRSS``); after them, ``VmHWM - VmRSS(before)`` is the most memory the
calls held at any moment beyond what the rank already held (gathered tensors, padding copies, receive buffers, the
retained full tensors), and ``VmRSS(after) - VmRSS(before)`` what the returned state still holds. The peak is exact
(the kernel tracks it), not sampled.

The centres travel in rounds of ``model.partial_fc.CHECKPOINT_BLOCK`` classes (recorded in the results).

Usage (from the repository root; about a minute, and about 6 GiB on rank 0 and 2 GiB on rank 1 at 1M classes):
    python -m benchmarks.checkpoint_gather_memory --output checkpoint_gather_memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import add_common_args, cli_main, environment, save_results, setup
from model.partial_fc import CHECKPOINT_BLOCK
from model.recognition import FaceRecognizer, RecognitionConfig

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=1_000_000, help="number of classes (default: 1000000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D (default: 512)")
    parser.add_argument("--world-size", type=int, default=2, help="processes (default: 2)")
    add_common_args(parser, device=False, threads_default=1)
    return parser


def _status_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB$", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line (this benchmark needs Linux)")
    return int(match.group(1))


def _reset_peak_rss() -> None:
    """Set this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


def _mib(tensors: list[torch.Tensor | None]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def _rank_main(rank: int, args: argparse.Namespace, port: int, out_dir: str) -> None:
    """One rank: build the sharded centres and their momentum, measure the checkpoint calls, write rank<r>.json."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size)
    config = RecognitionConfig(
        arch="vit_tiny", img_size=32, patch_size=16, embedding_size=args.dim, num_classes=args.classes, head="arcface"
    )
    model = FaceRecognizer(config)
    centres = model.partial_fc.weight
    optimizer = torch.optim.SGD([centres], lr=0.1, momentum=0.9)
    centres.grad = torch.zeros_like(centres)
    optimizer.step()  # momentum buffer = a copy of the gradient, one per local class
    centres.grad = None
    dist.barrier()

    _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    state = model.checkpoint_state_dict()
    optimizer_state = model.optimizer_state_dict(optimizer)
    seconds = time.perf_counter() - start
    peak, rss_after = _status_kib("VmHWM"), _status_kib("VmRSS")

    full_weight = state.get("partial_fc.weight")
    full_momentum = optimizer_state["state"].get(0, {}).get("momentum_buffer")
    result = {
        "rank": rank,
        "local_classes": centres.shape[0],
        "local_centres_mib": _mib([centres]),
        "rss_before_mib": rss_before / 1024,
        "peak_extra_mib": (peak - rss_before) / 1024,
        "retained_extra_mib": (rss_after - rss_before) / 1024,
        "returned_full_tensors_mib": _mib([full_weight, full_momentum]),
        "seconds": seconds,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(args: argparse.Namespace) -> int:
    """Runs the ranks, logs each rank's peak and writes the JSON results."""
    setup(args.threads)
    if args.classes < args.world_size or args.dim < 1 or args.world_size < 2:
        raise ValueError(
            f"need --world-size >= 2, --classes >= --world-size and --dim >= 1; got --world-size {args.world_size}, "
            f"--classes {args.classes}, --dim {args.dim}"
        )
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(args, _free_port(), out_dir), nprocs=args.world_size, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(args.world_size)]
    for r in ranks:
        logger.info(
            "rank %d: %d classes (%.0f MiB of centres), checkpoint calls %.1f s, peak +%.0f MiB, retained +%.0f MiB",
            r["rank"],
            r["local_classes"],
            r["local_centres_mib"],
            r["seconds"],
            r["peak_extra_mib"],
            r["retained_extra_mib"],
        )
    env = environment(torch.device("cpu"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"))
    report = {"args": vars(args), "environment": env, "checkpoint_block": CHECKPOINT_BLOCK, "results": ranks}
    save_results(report, args.output, logger)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(get_args_parser(), main, (ValueError,)))
