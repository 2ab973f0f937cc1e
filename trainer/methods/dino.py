"""Self-supervised pretraining (``--method dino`` and ``--method lafs``; docs/pretraining.md): DINO's student/teacher
on every training image, labels unread, and LAFS, DINO on the landmark mosaics of a frozen landmark CNN. Both write a
DINO-format ``checkpoint.pth`` that ``--pretrained-weights`` loads. Their recipes are DINO's ``main_dino.py`` and
LAFS's published one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from data_loader.datasets import GCDDataset, Split
from data_loader.multicrop import MultiCropTransform
from data_loader.recognition import RECOGNITION_SETS, identity_training_set, recognition_data_path
from data_loader.sampler import ShuffleSampler
from model.dino import DINO_CHECKPOINT, DINO_LOCAL_CROP_SIZE, DINOConfig, DINOSchedules, build_dino
from model.meta_arch import MetaArch
from trainer.args import add_landmark_args
from trainer.data import data_config, load_datasets
from trainer.methods.base import Method, MethodSetup, register_method
from trainer.validation import clustering_validation
from utils.checkpoint import CheckpointError
from utils.presets import preset_normalisation

# DINO's main_dino.py defaults (its lr is per 256 images, scaled linearly with the global batch).
DINO_RECIPE = {
    "arch": "vit_small",
    "input_preset": "gcd",
    "opt": "adamw",
    "lr_base": 5e-4,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "epochs": 100,
    "warmup_epochs": 10,
    "warmup_lr": 0.0,
    "min_lr": 1e-6,
    "clip_grad": 3.0,
    "batch_size": 64,
    "momentum_teacher": 0.996,
    "warmup_teacher_temp": 0.04,
    "teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0,
    "freeze_last_layer": 1,
    "head_out_dim": 65536,
    "drop_path_rate": 0.1,
    "local_crops_scale": (0.05, 0.4),
}


def add_dino_args(parser: argparse.ArgumentParser, title: str) -> None:
    """DINO's flags (``main_dino.py`` names)."""
    group = parser.add_argument_group(
        title,
        "Recipe (DINO's main_dino.py): AdamW, lr 5e-4 per 256 images of global batch (linear scaling), weight decay "
        "0.04 -> 0.4, 10 warm-up epochs, clipping 3.0; lr, weight decay and teacher momentum follow per-iteration "
        "cosine schedules.",
    )
    group.add_argument(
        "--head-out-dim", type=int, default=65536, help="prototypes of the DINO head (default: %(default)s)"
    )
    group.add_argument("--local-crops-number", type=int, default=8, help="local views per image (default: %(default)s)")
    group.add_argument(
        "--local-crops-size",
        type=int,
        default=None,
        help="local view side in pixels (default: 48 for dino, DINO's 96/224; the image size for lafs)",
    )
    group.add_argument(
        "--global-crops-scale", type=float, nargs=2, default=(0.4, 1.0), help="global crop area range (default: 0.4 1)"
    )
    group.add_argument(
        "--local-crops-scale",
        type=float,
        nargs=2,
        help="local crop area range (default: %(default)s; DINO's 0.05 0.4, LAFS's release cuts local crops with "
        "the global range 0.4 1)",
    )
    group.add_argument(
        "--drop-path-rate",
        "--drop_path_rate",
        dest="drop_path_rate",
        type=float,
        help="stochastic depth of the student's last block, linear from 0 over the blocks; the teacher has none "
        "(default: %(default)s, DINO's and LAFS's)",
    )
    group.add_argument(
        "--momentum-teacher", type=float, default=0.996, help="teacher EMA start, cosine to 1 (default: %(default)s)"
    )
    group.add_argument(
        "--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at epoch 0 (default: %(default)s)"
    )
    group.add_argument(
        "--teacher-temp", type=float, default=0.04, help="teacher temperature after the warm-up (default: %(default)s)"
    )
    group.add_argument(
        "--warmup-teacher-temp-epochs",
        type=int,
        default=0,
        help="epochs of the linear teacher-temperature warm-up (default: %(default)s)",
    )
    group.add_argument(
        "--weight-decay-end", type=float, default=0.4, help="weight decay at the end, cosine (default: %(default)s)"
    )
    group.add_argument(
        "--freeze-last-layer",
        type=int,
        default=1,
        help="epochs with the head's last layer frozen (default: %(default)s)",
    )


@register_method
class DINOPretraining(Method):
    """DINO on every training image of a benchmark (or a whole identity set), no label read."""

    name = "dino"
    config_class = DINOConfig
    summary = (
        "self-supervised DINO pretraining on every training image, labels unused; writes the DINO checkpoint.pth "
        "that --pretrained-weights loads"
    )
    lr_scaling = "linear"
    recipe = DINO_RECIPE
    uses_landmarks = False

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        add_dino_args(parser, "DINO pretraining (--method dino)")

    @classmethod
    def build(cls, args: argparse.Namespace, image_size: int) -> MethodSetup:
        if args.dataset in RECOGNITION_SETS:
            data = identity_training_set(args.dataset, recognition_data_path(args), image_size, args.input_preset)
            source, count, gcd, settings = data.train.source, len(data.train), None, data.facts
        else:
            gcd = load_datasets(args, image_size)
            source, count, settings = gcd.train_eval.source, len(gcd.train_eval), data_config(args, gcd, image_size)
        lafs = cls.uses_landmarks
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
            drop_path_rate=args.drop_path_rate,
            **(cls.landmark_config(args) if lafs else {}),
        )
        model = build_dino(
            config, landmark_weights=args.landmark_weights if lafs else None, weights_only=not args.unsafe_load
        )
        transform = cls.multicrop_transform(args, image_size)
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
            **clustering_validation(gcd),
            description=f"{args.dataset}: {count} training images, self-supervised ({config.n_global} global + "
            f"{config.n_local} local views)",
            prepare_schedules=use_schedules,
        )

    @classmethod
    def multicrop_transform(cls, args: argparse.Namespace, image_size: int) -> MultiCropTransform:
        """The views of every training image: crop sizes and scales from the flags, the input preset's normalisation
        (DINO's ImageNet statistics under ``gcd``; LAFS's release, mean and std 0.5, under ``face``, its default).

        Args:
            args: parsed flags (``--local-crops-*``, ``--global-crops-scale``, ``--input-preset``).
            image_size: the global view side.

        Returns:
            The transform; LAFS's views are (augmented, clean) pairs.
        """
        # LAFS crops its local views at the global size (the landmark CNN's input) and shrinks them to 6 x 6 landmarks
        local_size = args.local_crops_size or (image_size if cls.uses_landmarks else DINO_LOCAL_CROP_SIZE)
        mean, std = preset_normalisation(args.input_preset)
        return MultiCropTransform(
            image_size,
            local_size,
            args.local_crops_number,
            tuple(args.global_crops_scale),
            tuple(args.local_crops_scale),
            split_photometric=cls.uses_landmarks,
            mean=mean,
            std=std,
        )

    @classmethod
    def load_for_embedding(
        cls, ckpt: dict[str, Any], path: str | Path, *, weights_only: bool, flags: argparse.Namespace | None = None
    ) -> MetaArch:
        run = Path(path).parent
        raise CheckpointError(
            f"{path} is a self-supervised pretraining run (--method {cls.name}): it learns a backbone to start "
            f"from, not a model to evaluate. Train FaceGCD or recognition from it with --pretrained-weights "
            f"{run / DINO_CHECKPOINT}, then extract or verify that run's checkpoint"
        )


@register_method
class LAFSPretraining(DINOPretraining):
    """LAFS: DINO on the landmark mosaics of the frozen ``--landmark-weights`` CNN."""

    name = "lafs"
    summary = (
        "DINO on the landmark mosaics of the frozen --landmark-weights CNN (LAFS); also writes that CNN as "
        "landmark_cnn.pth"
    )
    uses_landmarks = True
    # LAFS's published recipe (docs/pretraining.md): 100,000 prototypes, teacher temperature 0.07 -> 0.04 over 30
    # epochs, 41 epochs, 82 images per GPU; its release cuts the local crops with the global crops' area range and
    # normalises with mean and std 0.5 (the face preset); the rest is DINO's (lr scaled linearly, stochastic depth).
    recipe = {
        **DINO_RECIPE,
        "input_preset": "face",
        "local_crops_scale": (0.4, 1.0),
        "head_out_dim": 100000,
        "warmup_teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 30,
        "epochs": 41,
        "batch_size": 82,
    }

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        add_dino_args(parser, "LAFS pretraining (--method lafs)")
        add_landmark_args(
            parser,
            switch=False,
            help_weights="the frozen landmark CNN whose mosaics LAFS sees, in the reference key format (a Part fViT "
            "run's landmark_cnn.pth) (default: %(default)s)",
        )
        group = parser.add_argument_group("LAFS landmarks (--method lafs)")
        group.add_argument(
            "--landmark-jitter",
            type=float,
            default=5.0,
            help="Gaussian jitter std of every landmark in pixels (default: %(default)s)",
        )
        group.add_argument(
            "--local-landmarks",
            type=int,
            default=36,
            help="landmarks a local view keeps, a square number (default: %(default)s, a 6 x 6 mosaic)",
        )

    @classmethod
    def resolve_args(cls, args: argparse.Namespace, explicit: set[str]) -> None:
        """A run shorter than the recipe's 30-epoch teacher-temperature warm-up warms up over all its epochs."""
        if "warmup_teacher_temp_epochs" not in explicit:
            args.warmup_teacher_temp_epochs = min(args.warmup_teacher_temp_epochs, args.epochs)

    @classmethod
    def landmark_config(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The ``DINOConfig`` fields of the landmark front end."""
        return {
            "landmark_cnn": True,
            "landmark_tiles": args.landmark_tiles,
            "landmark_jitter": args.landmark_jitter,
            "local_landmarks": args.local_landmarks,
        }
