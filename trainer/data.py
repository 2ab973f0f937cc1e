"""Data plumbing shared by the three scripts: resolving the benchmark root and building loaders."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data_loader import build_gcd_datasets, get_spec
from data_loader.datasets import GCDDatasets
from data_loader.sampler import BalancedSampler
from utils.distributed import barrier, get_rank, is_primary

logger = logging.getLogger(__name__)


def resolve_data_path(args: argparse.Namespace) -> Path:
    """The benchmark root: ``--data-path``, else ``data/<dataset>``; SynthFaces presets are generated if missing.

    Generation happens on the primary rank; the others wait at a barrier.
    """
    spec = get_spec(args.dataset)
    root = Path(args.data_path) if args.data_path else Path("data") / spec.name
    if spec.name.startswith("synthfaces"):
        from data_loader.synthface import ensure_synthfaces

        if is_primary():
            ensure_synthfaces(root, spec.name)
        barrier()
    return root


def load_datasets(args: argparse.Namespace, image_size: int) -> GCDDatasets:
    """Build the GCD datasets for ``args.dataset`` (split and labelled subset depend on seeds only)."""
    return build_gcd_datasets(
        args.dataset,
        resolve_data_path(args),
        image_size=image_size,
        prop_train_labels=args.prop_train_labels,
        skip_corrupt=args.skip_corrupt,
    )


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed for augmentations, base prompts and loader workers of one (seed, rank, epoch)."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def make_train_loader(
    datasets: GCDDatasets, args: argparse.Namespace, device: torch.device
) -> tuple[DataLoader, BalancedSampler, torch.Generator]:
    """The balanced, distributed training loader (``drop_last=True``).

    Returns:
        The loader, its sampler (call ``set_epoch``) and the generator that seeds its workers (reseed per epoch).
    """
    labelled = torch.zeros(len(datasets.train), dtype=torch.bool)
    labelled[: int(datasets.labelled_mask.sum())] = True
    sampler = BalancedSampler(labelled, seed=args.seed, mode=args.sampler)
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(args.seed, get_rank(), 0))
    if len(sampler) < args.batch_size:
        raise ValueError(
            f"--batch-size {args.batch_size} is larger than the {len(sampler)} samples each rank draws per epoch "
            f"from {args.dataset}; lower --batch-size"
        )
    loader = DataLoader(
        datasets.train,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=args.pin_mem and device.type == "cuda",
        drop_last=True,
        generator=generator,
        persistent_workers=False,
    )
    return loader, sampler, generator
