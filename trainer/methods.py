"""The parts of a run that depend on the training method (``--method``); everything else in train.py is shared.

Each builder returns a :class:`MethodSetup`: the method's model (a ``model.meta_arch.MetaArch``), the configuration
stored in its checkpoints, its training set and sampler, the data settings checkpoints carry, and the sets the
clustering validation runs on.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from torch.utils.data import Dataset

from data_loader.datasets import GCDDataset, GCDDatasets, Split
from data_loader.multicrop import MultiCropTransform
from data_loader.recognition import (
    RECOGNITION_SETS,
    identity_training_set,
    labelled_training_set,
    recognition_data_path,
)
from data_loader.sampler import BalancedSampler, ShuffleSampler
from model.dino import DINO_LOCAL_CROP_SIZE, DINOConfig, DINOSchedules, build_dino
from model.facegcd import build_facegcd, load_facegcd_checkpoint
from model.landmark import load_landmark_weights
from model.meta_arch import MetaArch
from model.recognition import RecognitionConfig, build_recognizer
from trainer.args import model_config_from_args
from trainer.data import data_config, load_datasets
from utils.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class MethodSetup:
    """What the shared loop needs from a method.

    Attributes:
        model: the method (unwrapped).
        model_config: plain-type configuration stored in checkpoints (``method`` names the method).
        train_set: the training dataset.
        sampler: its sampler (``set_epoch``, ``state_dict``).
        data_config: the data settings and listing facts stored in checkpoints.
        eval_sets: name -> dataset for the clustering validation (empty when the data has no GCD split).
        num_classes: K of the validation clustering.
        num_known: labels below this are old (validation metrics).
        description: one log line about the data.
        prepare_schedules: called with (steps per epoch, lr) once the loader exists, for methods with per-step
            schedules (DINO), or None.
    """

    model: MetaArch
    model_config: dict[str, Any]
    train_set: Dataset
    sampler: Any
    data_config: dict[str, Any]
    eval_sets: dict[str, Dataset] = field(default_factory=dict)
    num_classes: int = 0
    num_known: int = 0
    description: str = ""
    prepare_schedules: Callable[[int, float], None] | None = None


def _clustering_validation(gcd: GCDDatasets | None) -> dict[str, Any]:
    """The validation fields of a :class:`MethodSetup`: D_U and the test split of a GFD benchmark, or none."""
    if gcd is None:
        return {"eval_sets": {}, "num_classes": 0, "num_known": 0}
    sets = {"unlabelled": gcd.unlabelled_eval, "test": gcd.test_eval}
    return {"eval_sets": sets, "num_classes": gcd.num_classes, "num_known": gcd.num_known}


def build_facegcd_setup(args: argparse.Namespace, image_size: int) -> MethodSetup:
    """FaceGCD on D_L ++ D_U with the balanced sampler."""
    datasets = load_datasets(args, image_size)
    config = model_config_from_args(args)
    model = build_facegcd(
        config,
        pretrained_weights=args.pretrained_weights,
        checkpoint_key=args.checkpoint_key,
        weights_only=not args.unsafe_load,
        landmark_weights=args.landmark_weights if args.landmark_cnn else None,
    )
    if args.initial_checkpoint:
        load_facegcd_checkpoint(
            args.initial_checkpoint,
            model,
            pretrained_weights=args.pretrained_weights,
            weights_only=not args.unsafe_load,
        )
    labelled = datasets.labelled_mask.new_zeros(len(datasets.train))
    labelled[: int(datasets.labelled_mask.sum())] = True
    return MethodSetup(
        model=model,
        model_config=config.to_dict(),
        train_set=datasets.train,
        sampler=BalancedSampler(labelled, seed=args.seed, mode=args.sampler),
        data_config=data_config(args, datasets, image_size),
        **_clustering_validation(datasets),
        description=(
            f"{args.dataset}: {datasets.num_classes} classes ({datasets.num_known} known), "
            f"{int(datasets.labelled_mask.sum())} labelled + {len(datasets.unlabelled_eval)} unlabelled training "
            f"images, {len(datasets.test_eval)} test images"
        ),
    )


def build_recognition_setup(args: argparse.Namespace, image_size: int) -> MethodSetup:
    """Margin-softmax recognition on a GFD benchmark's D_L, or on a whole identity-labelled set."""
    if args.dataset in RECOGNITION_SETS:
        data = identity_training_set(args.dataset, recognition_data_path(args), image_size)
        settings = data.facts
    else:
        datasets = load_datasets(args, image_size)
        data = labelled_training_set(datasets, image_size)
        settings = {**data_config(args, datasets, image_size), **data.facts}
    config = RecognitionConfig(
        arch=args.arch,
        img_size=image_size,
        patch_size=args.patch_size,
        embedding_size=args.embedding_size,
        num_classes=data.num_classes,
        head=args.head,
        head_args=dict(args.head_args),
        sample_rate=args.sample_rate,
        dropout=args.dropout,
        landmark_cnn=args.landmark_cnn,
        landmark_tiles=args.landmark_tiles,
        landmark_regularisation=args.landmark_regularisation,
    )
    model = build_recognizer(config, args.pretrained_weights, args.checkpoint_key, weights_only=not args.unsafe_load)
    if model.front_end is not None:
        _initial_landmarks(model, args)
    if args.initial_checkpoint:
        model.load_checkpoint_state_dict(
            load_checkpoint(args.initial_checkpoint, weights_only=not args.unsafe_load)["state_dict"]
        )
    gcd = data.gcd
    return MethodSetup(
        model=model,
        model_config=config.to_dict(),
        train_set=data.train,
        sampler=ShuffleSampler(len(data.train), seed=args.seed),
        data_config=settings,
        **_clustering_validation(gcd),
        description=f"{args.dataset}: {data.num_classes} identities, {len(data.train)} training images"
        + ("" if gcd is None else f" (the labelled subset D_L; validation clusters {gcd.num_classes} classes)"),
    )


def _initial_landmarks(model: Any, args: argparse.Namespace) -> None:
    """Part fViT's landmark CNN starts from ``--landmark-weights`` when that file exists (required for LAFS
    fine-tuning, whose regularisation pulls towards it), else from its random initialisation."""
    path = Path(args.landmark_weights)
    if path.is_file():
        load_landmark_weights(path, model.front_end, weights_only=not args.unsafe_load)
        logger.info("Part fViT: landmark CNN from %s", path)
    elif args.landmark_regularisation:
        raise FileNotFoundError(
            f"--landmark-regularisation pulls towards --landmark-weights {path}, which does not exist"
        )
    else:
        logger.info("Part fViT: landmark CNN from its random initialisation (no file at --landmark-weights %s)", path)
    model.freeze_reference_landmarks()


def build_dino_setup(args: argparse.Namespace, image_size: int) -> MethodSetup:
    """DINO (or LAFS: DINO on landmark mosaics) on every training image, no label read; multi-crop views, clustering
    validation on a GFD benchmark."""
    if args.dataset in RECOGNITION_SETS:
        data = identity_training_set(args.dataset, recognition_data_path(args), image_size)
        source, count, gcd, settings = data.train.source, len(data.train), None, data.facts
    else:
        gcd = load_datasets(args, image_size)
        source, count, settings = gcd.train_eval.source, len(gcd.train_eval), data_config(args, gcd, image_size)
    lafs = args.method == "lafs"
    config = DINOConfig(
        arch=args.arch,
        patch_size=args.patch_size,
        img_size=image_size,
        out_dim=args.head_out_dim,
        n_local=args.local_crops_number,
        epochs=args.epochs,
        warmup_teacher_temp=args.warmup_teacher_temp,
        teacher_temp=args.teacher_temp,
        warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
        landmark_cnn=lafs,
        landmark_tiles=args.landmark_tiles,
        landmark_jitter=args.landmark_jitter,
        local_landmarks=args.local_landmarks,
    )
    model = build_dino(
        config, landmark_weights=args.landmark_weights if lafs else None, weights_only=not args.unsafe_load
    )
    # LAFS crops its local views at the global size (the landmark CNN's input) and shrinks them to 6 x 6 landmarks
    local_size = args.local_crops_size or (image_size if lafs else DINO_LOCAL_CROP_SIZE)
    transform = MultiCropTransform(
        image_size,
        local_size,
        args.local_crops_number,
        tuple(args.global_crops_scale),
        tuple(args.local_crops_scale),
        split_photometric=lafs,
    )
    labels = np.zeros(count, dtype=np.int64)  # self-supervised: no label is read
    train_set = GCDDataset(source, np.arange(count), labels, transform, Split.TRAIN)

    def use_schedules(steps_per_epoch: int, lr: float) -> None:
        schedules = DINOSchedules.build(
            lr=lr,
            min_lr=args.min_lr,
            epochs=args.epochs,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=args.warmup_epochs,
            weight_decay=args.weight_decay,
            weight_decay_end=args.weight_decay_end,
            momentum_teacher=args.momentum_teacher,
        )
        model.use_schedules(schedules, freeze_last_layer=args.freeze_last_layer)

    return MethodSetup(
        model=model,
        model_config=config.to_dict(),
        train_set=train_set,
        sampler=ShuffleSampler(count, seed=args.seed),
        data_config={**settings, "train_set": "all images, unlabelled"},
        **_clustering_validation(gcd),
        description=f"{args.dataset}: {count} training images, self-supervised ({config.n_global} global + "
        f"{config.n_local} local views)",
        prepare_schedules=use_schedules,
    )


def build_method(args: argparse.Namespace, image_size: int) -> MethodSetup:
    """The :class:`MethodSetup` of ``args.method``."""
    builders = {
        "facegcd": build_facegcd_setup,
        "recognition": build_recognition_setup,
        "dino": build_dino_setup,
        "lafs": build_dino_setup,
    }
    return builders[args.method](args, image_size)
