"""FaceCoresetNet (``--method coreset``): a template aggregator trained over a frozen recognizer (docs/coreset.md).

The recognizer is a ``--method recognition`` checkpoint (``--recognizer``; AdaFace-trained, so that the embedding
norm carries quality); the input size and preset are the recognizer's. Templates are simulated from the identities of
the training set (``data_loader.templates``): the same sets as the recognition method (a benchmark's labelled subset
D_L, or a whole ``recognition_folders`` / ``recognition_recordio`` set). The recipe is the paper's (train.sh): AdamW,
lr 1e-4, weight decay 1e-3 (none on gamma), batch 20, gradient clipping 1.0, 2 epochs at a constant rate.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data_loader.recognition import (
    RECOGNITION_SETS,
    identity_training_set,
    labelled_training_set,
    recognition_data_path,
)
from data_loader.templates import CachedTemplates, CacheViews, FrameAugment, ImageTemplates, TemplateSampler
from model.backbones import IRESNET_ARCHS
from model.coreset import DEFAULT_CORE_SIZE
from model.coreset_net import HEAD_ARGS, CoresetConfig, CoresetNet, coreset_from_checkpoint, load_recognizer
from model.recognition import FaceRecognizer
from trainer.args import parse_head_arg
from trainer.data import data_config, load_datasets
from trainer.methods.base import VIT_ARCHS, Method, MethodSetup, register_method
from utils.checkpoint import load_checkpoint
from utils.distributed import is_primary
from utils.sharding import gather_rows_by_index, strided_shard

logger = logging.getLogger(__name__)


@register_method
class CoresetMethod(Method):
    """FaceCoresetNet's aggregator over a frozen recognizer; see the module docstring."""

    name = "coreset"
    config_class = CoresetConfig
    summary = (
        "FaceCoresetNet template aggregator (quality-aware farthest-point core + attention) trained over a frozen "
        "recognition checkpoint (--recognizer) on simulated templates"
    )
    archs = VIT_ARCHS + IRESNET_ARCHS
    lr_scaling = "none"
    recipe = {
        "opt": "adamw",
        "lr_base": 1e-4,
        "weight_decay": 1e-3,
        "epochs": 2,
        "sched": "step",
        "warmup_epochs": 0,
        "warmup_lr": 0.0,
        "min_lr": 0.0,
        "clip_grad": 1.0,
        "batch_size": 20,
        "input_preset": "face",
    }

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "FaceCoresetNet (--method coreset)",
            "Recipe (the paper's train.sh): AdamW lr 1e-4 (not scaled with the batch), weight decay 1e-3 and none on "
            "gamma, batch 20 templates, gradient clipping 1.0, 2 epochs at a constant rate; AdaFace head s 48, m 0.8, "
            "h 0.333. --arch, --input-size and --input-preset are the recognizer's.",
        )
        group.add_argument(
            "--recognizer",
            dest="recognizer_weights",
            required=True,
            metavar="CKPT",
            help="the frozen recognizer: a --method recognition checkpoint, ideally --head adaface (required)",
        )
        group.add_argument(
            "--core-size",
            "--coreset_size",
            dest="core_size",
            type=int,
            default=DEFAULT_CORE_SIZE,
            help="K, core items per template (the paper's best; the release's default is 5) (default: %(default)s)",
        )
        group.add_argument(
            "--max-template-size",
            "--max_template_size",
            dest="max_template_size",
            type=int,
            default=20,
            help="simulated templates have U{1..this} frames (default: %(default)s)",
        )
        group.add_argument(
            "--max-clip-length",
            type=int,
            default=3,
            help="longest simulated clip (augmented copies of one image) (default: %(default)s)",
        )
        group.add_argument(
            "--cache-augmentations",
            type=int,
            default=0,
            metavar="A",
            help="embed A augmented views of every image once with the frozen recognizer and draw templates from that "
            "cache: no image is decoded or embedded while training, at the price of A views per image instead of a "
            "fresh one per frame (default: 0, embed every frame)",
        )
        group.add_argument(
            "--coreset-dropout",
            type=float,
            default=0.1,
            help="dropout of the aggregator's attention (default: %(default)s)",
        )
        group.add_argument(
            "--head-args",
            nargs="*",
            type=parse_head_arg,
            default=[],
            metavar="NAME=VALUE",
            help="overrides of the AdaFace head's s=48 m=0.8 h=0.333 (default: none)",
        )

    @classmethod
    def resolve_args(cls, args: argparse.Namespace, explicit: set[str]) -> None:
        for dest in ("core_size", "max_template_size", "max_clip_length"):
            if getattr(args, dest) < 1:
                raise ValueError(f"--{dest.replace('_', '-')} must be >= 1, got {getattr(args, dest)}")
        if args.cache_augmentations < 0:
            raise ValueError(f"--cache-augmentations must be >= 0, got {args.cache_augmentations}")
        if not 0.0 <= args.coreset_dropout < 1.0:
            raise ValueError(f"--coreset-dropout must be in [0, 1), got {args.coreset_dropout}")
        path = Path(args.recognizer_weights)
        if not path.is_file():
            raise ValueError(f"--recognizer {path}: no such file (expected a --method recognition checkpoint)")
        ckpt = load_checkpoint(path, weights_only=not args.unsafe_load, mmap=True)
        stored = ckpt.get("model_config") or {}
        if stored.get("method") != "recognition":
            raise ValueError(f"--recognizer {path} is not a --method recognition checkpoint")
        taken = {
            "arch": stored["arch"],
            "input_size": (3, int(stored["img_size"]), int(stored["img_size"])),
            "input_preset": (ckpt.get("data_config") or {}).get("input_preset", "gcd"),
        }
        for dest, value in taken.items():
            given = tuple(getattr(args, dest)) if dest == "input_size" else getattr(args, dest)
            if dest in explicit and given != value:
                raise ValueError(
                    f"--{dest.replace('_', '-')} {given} contradicts the recognizer {path} ({value}); drop the flag"
                )
            setattr(args, dest, value)

    @classmethod
    def build(cls, args: argparse.Namespace, image_size: int) -> MethodSetup:
        recognizer, identity = load_recognizer(args.recognizer_weights, weights_only=not args.unsafe_load)
        preset = identity["input_preset"]
        if args.dataset in RECOGNITION_SETS:
            data = identity_training_set(args.dataset, recognition_data_path(args), image_size, preset)
            settings = data.facts
        else:
            datasets = load_datasets(args, image_size)
            data = labelled_training_set(datasets, image_size, preset)
            settings = {**data_config(args, datasets, image_size), **data.facts}
        images = _ImageLoader(data.train.source, data.train.uq_idx)
        labels = data.train.targets
        augment = FrameAugment(image_size, preset)
        common = dict(seed=args.seed, max_size=args.max_template_size, max_clip=args.max_clip_length)
        if args.cache_augmentations:
            views = CacheViews(images, len(labels), augment, args.cache_augmentations, args.seed)
            cache = cache_embeddings(
                recognizer, views, _device(args), args.batch_size * 4, args.workers, progress=not args.no_progress
            )
            train_set = CachedTemplates(cache, labels, **common)
        else:
            train_set = ImageTemplates(images, labels, augment, **common)
        config = CoresetConfig(
            img_size=image_size,
            embedding_size=identity["embedding_size"],
            core_size=args.core_size,
            dropout=args.coreset_dropout,
            num_classes=data.num_classes,
            head_args={**HEAD_ARGS, **dict(args.head_args)},
            max_template_size=args.max_template_size,
            max_clip_length=args.max_clip_length,
            cache_augmentations=args.cache_augmentations,
            recognizer=identity,
        )
        model = CoresetNet(config, recognizer)
        if args.initial_checkpoint:
            model.load_checkpoint_state_dict(
                load_checkpoint(args.initial_checkpoint, weights_only=not args.unsafe_load)["state_dict"]
            )
        # the recognizer defines the aggregator's input: a resume with another one is refused as other data
        settings = {
            **settings,
            "recognizer_sha256": identity["sha256"],
            "cache_augmentations": args.cache_augmentations,
        }
        return MethodSetup(
            model=model,
            model_config=config.to_dict(),
            train_set=train_set,
            sampler=TemplateSampler(len(labels), seed=args.seed),
            data_config=settings,
            description=f"{args.dataset}: templates of {data.num_classes} identities from {len(labels)} images"
            + (f" ({args.cache_augmentations} cached views each)" if args.cache_augmentations else "")
            + f"; recognizer {identity['path']} ({identity['arch']}, {identity['embedding_size']}-d)",
        )

    @classmethod
    def load_for_embedding(
        cls, ckpt: dict[str, Any], path: str | Path, *, weights_only: bool, flags: argparse.Namespace | None = None
    ) -> CoresetNet:
        return coreset_from_checkpoint(ckpt, path, weights_only=weights_only)


class _ImageLoader:
    """Image id -> RGB PIL image of a training listing (picklable for loader workers)."""

    def __init__(self, source: Any, uq_idx: np.ndarray) -> None:
        self.source, self.uq_idx = source, uq_idx

    def __call__(self, image: int) -> Image.Image:
        return self.source.load(int(self.uq_idx[image]))


def _device(args: argparse.Namespace) -> torch.device:
    """This process's device (as ``utils.distributed.init_distributed`` chose it)."""
    use_cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


@torch.no_grad()
def cache_embeddings(
    recognizer: FaceRecognizer,
    views: CacheViews,
    device: torch.device,
    batch_size: int,
    workers: int,
    progress: bool = True,
) -> torch.Tensor:
    """The frozen recognizer's embeddings of every cached view, sharded over the ranks and gathered (collective).

    Returns:
        (images, A, D) float32 unnormalised embeddings on the CPU, the same on every rank.
    """
    shard = strided_shard(len(views))
    loader = DataLoader(Subset(views, shard), batch_size=batch_size, num_workers=workers, shuffle=False)
    recognizer = recognizer.to(device).eval()
    rows = []
    for batch in tqdm(loader, desc="embedding cache", unit="batch", disable=not (progress and is_primary())):
        rows.append(recognizer.forward_features(batch.to(device)).float())
    dim = recognizer.cfg.embedding_size
    local = torch.cat(rows) if rows else torch.zeros(0, dim, device=device)
    _, (embeddings,) = gather_rows_by_index(torch.tensor(shard, dtype=torch.int64), [local], device)
    logger.info("embedding cache: %d views of %d images", len(views), views.num_images)
    return embeddings.view(views.num_images, views.slots, dim)
