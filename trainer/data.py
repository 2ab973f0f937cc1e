"""Data plumbing shared by the three scripts: the benchmark root, the data settings a checkpoint carries, loaders.

The settings that define D_L and D_U (dataset, data path, ``--prop-train-labels``, ``--split-seed``, the number of
known classes, image size) are stored in every training checkpoint as ``data_config``. Extraction and SSK read them
from there: a value given on their command line that contradicts the checkpoint is an error naming both.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from data_loader import build_gcd_datasets, get_spec
from data_loader.datasets import GCDDatasets
from utils.distributed import barrier, get_rank, is_primary
from utils.presets import GCD_PRESET

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
        seed=args.split_seed,
        num_known=args.num_known,
        skip_corrupt=args.skip_corrupt,
        input_preset=args.input_preset,
    )


class DataConfigError(ValueError):
    """Command-line data settings that contradict the ones a checkpoint was trained with."""


# data_config field -> (args attribute, flag named in errors)
_DATA_FLAGS = {
    "dataset": ("dataset", "--dataset"),
    "data_path": ("data_path", "--data-path"),
    "prop_train_labels": ("prop_train_labels", "--prop-train-labels"),
    "split_seed": ("split_seed", "--split-seed"),
    "num_known": ("num_known", "--num-known"),
    "input_preset": ("input_preset", "--input-preset"),
}


def labelled_digest(labelled_mask: torch.Tensor) -> str:
    """SHA-256 of the labelled mask over the train listing: which images form D_L."""
    return hashlib.sha256(labelled_mask.to(torch.bool).numpy().tobytes()).hexdigest()


def listing_facts(datasets: GCDDatasets) -> dict[str, Any]:
    """Facts that identify a benchmark's listing: classes, train and test images, and which images are labelled."""
    return {
        "num_classes": int(datasets.num_classes),
        "num_train": len(datasets.train_labels),
        "num_test": len(datasets.test_labels),
        "num_labelled": int(datasets.labelled_mask.sum()),
        "labelled_digest": labelled_digest(datasets.labelled_mask),
    }


def data_config(args: argparse.Namespace, datasets: GCDDatasets, image_size: int) -> dict[str, Any]:
    """The settings that define D_L and D_U, plus the listing's counts, as plain types (stored in checkpoints).

    Args:
        args: parsed arguments of the run.
        datasets: the datasets built from them.
        image_size: the run's square image size.

    Returns:
        ``dataset`` (canonical name), ``data_path`` (absolute), ``prop_train_labels``, ``split_seed``, ``num_known``,
        ``image_size``, ``input_preset`` and the counts of :func:`listing_facts`.
    """
    return {
        "dataset": datasets.spec.name,
        "data_path": str(Path(datasets.root).resolve()),
        "prop_train_labels": float(args.prop_train_labels),
        "split_seed": int(args.split_seed),
        "num_known": int(datasets.num_known),
        "image_size": int(image_size),
        "input_preset": args.input_preset,
        **listing_facts(datasets),
    }


def _same(field: str, given: Any, stored: Any) -> bool:
    if field == "dataset":
        return get_spec(given).name == get_spec(stored).name
    if field == "data_path":
        return Path(given).resolve() == Path(stored).resolve()
    if field == "prop_train_labels":
        return abs(float(given) - float(stored)) < 1e-12
    if field == "input_preset":
        return given == stored
    return int(given) == int(stored)


def apply_data_config(
    args: argparse.Namespace, stored: dict[str, Any], explicit: set[str], source: str, image_size: int | None = None
) -> None:
    """Take the data settings of a checkpoint into ``args``; a contradicting explicit flag is an error.

    Args:
        args: arguments of extraction or SSK; their data fields are overwritten with the stored values.
        stored: the checkpoint's ``data_config``.
        explicit: destinations of the flags given on the command line.
        source: the checkpoint path, for messages.
        image_size: the image size the run will use, when the flags set it explicitly (checked against the stored one).

    Raises:
        DataConfigError: a flag given on the command line disagrees with the checkpoint (both values named).
    """
    for field, (dest, flag) in _DATA_FLAGS.items():
        if field not in stored:
            continue
        given = getattr(args, dest)
        if dest in explicit and given is not None and not _same(field, given, stored[field]):
            if field == "data_path" and getattr(args, "data_relocated", False):
                logger.warning("--data-path %s replaces the checkpoint's %s (--data-relocated)", given, stored[field])
                continue
            hint = " (pass --data-relocated if the same benchmark was moved there)" if field == "data_path" else ""
            raise DataConfigError(
                f"{flag} {given} contradicts the checkpoint {source}, which was trained with {flag} {stored[field]}; "
                f"drop the flag to use the training setting{hint}"
            )
        setattr(args, dest, stored[field])
        if field == "data_path" and dest not in explicit and not Path(stored[field]).exists():
            raise DataConfigError(
                f"the checkpoint {source} was trained on data at {stored[field]}, which does not exist here; pass "
                "--data-path with the benchmark's location and --data-relocated"
            )
    if image_size is not None and "image_size" in stored and int(image_size) != int(stored["image_size"]):
        raise DataConfigError(
            f"--input-size 3 {image_size} {image_size} contradicts the checkpoint {source}, trained at "
            f"{stored['image_size']} px; drop the flag"
        )


def take_input_preset(args: argparse.Namespace, stored: str | None, explicit: set[str], source: str | None) -> None:
    """Set ``args.input_preset`` to the checkpoint's preset (``stored``); without a checkpoint, the flag's or ``gcd``.

    Raises:
        DataConfigError: ``--input-preset`` given on the command line contradicts the checkpoint.
    """
    if stored is None:
        args.input_preset = args.input_preset or GCD_PRESET
        return
    if "input_preset" in explicit and args.input_preset not in (None, stored):
        raise DataConfigError(
            f"--input-preset {args.input_preset} contradicts the checkpoint {source}, trained with --input-preset "
            f"{stored}; drop the flag"
        )
    args.input_preset = stored


def _differences(stored: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: checkpoint X, now Y`` for every key both hold that differs (settings compared as in the CLI check)."""
    out = []
    for key, value in current.items():
        if key in ignore or key not in stored:
            continue
        same = _same(key, value, stored[key]) if key in _DATA_FLAGS else value == stored[key]
        if not same:
            out.append(f"{key}: checkpoint {stored[key]}, now {value}")
    return out


def check_listing(datasets: GCDDatasets, stored: dict[str, Any], source: str) -> None:
    """The benchmark just read must be the one the checkpoint was trained on (same counts, same labelled subset).

    Raises:
        DataConfigError: the data tree changed since training (counts named).
    """
    changed = _differences(stored, listing_facts(datasets))
    if changed:
        raise DataConfigError(
            f"the benchmark at {datasets.root} differs from the one {source} was trained on ({'; '.join(changed)})"
        )


def check_same_data(stored: dict[str, Any] | None, current: dict[str, Any], source: str) -> None:
    """A resumed run trains on the checkpoint's D_L and D_U (only the data path may differ: the tree may have moved).

    Raises:
        DataConfigError: a setting or listing fact differs (each named with both values).
    """
    changed = _differences(stored or {}, current, ignore=("data_path",))
    if changed:
        raise DataConfigError(f"{source} was trained on other data settings ({'; '.join(changed)})")


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed for augmentations, base prompts and loader workers of one (seed, rank, epoch)."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def make_train_loader(
    dataset: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, args: argparse.Namespace, device: torch.device
) -> tuple[DataLoader, torch.Generator]:
    """The distributed training loader of a method's dataset and sampler (``drop_last=True``).

    Host memory is pinned on CUDA unless ``--no-pin-mem`` is given, so the batches' ``non_blocking`` copies overlap
    with compute (unpinned, they are synchronous).

    Returns:
        The loader and the generator that seeds its workers (reseed per epoch).
    """
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(args.seed, get_rank(), 0))
    if len(sampler) < args.batch_size:
        raise ValueError(
            f"--batch-size {args.batch_size} is larger than the {len(sampler)} samples each rank draws per epoch "
            f"from {args.dataset}; lower --batch-size"
        )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda" and args.pin_mem is not False,
        drop_last=True,
        generator=generator,
        persistent_workers=False,
    )
    return loader, generator
