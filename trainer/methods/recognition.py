"""Margin-softmax recognition (``--method recognition``): an embedding backbone trained with a margin head over
Partial FC class centres (docs/recognition.md), on a GFD benchmark's labelled identities (the ArcFace baseline) or on a
whole identity-labelled set. Part fViT is this method with ``--landmark-cnn``; TransFace is this method with a
``transface_vit_*`` backbone and ``--dpap`` / ``--ehsm`` (docs/transface.md). Its recipe is arcface_torch's."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from data_loader.recognition import (
    RECOGNITION_SETS,
    identity_training_set,
    labelled_training_set,
    recognition_data_path,
)
from data_loader.sampler import ShuffleSampler
from model.backbones import IRESNET_ARCHS
from model.landmark import load_landmark_weights
from model.margin_heads import MARGIN_HEADS
from model.partial_fc import WEIGHT_NORMALISATIONS
from model.recognition import (
    WEIGHT_DECAY_SCOPES,
    FaceRecognizer,
    RecognitionConfig,
    build_recognizer,
    recognizer_from_checkpoint,
)
from model.transface_vit import PATCH, TRANSFACE_ARCHS
from trainer.args import add_landmark_args, parse_head_arg
from trainer.data import data_config, load_datasets
from trainer.methods.base import VIT_ARCHS, Method, MethodSetup, register_method
from trainer.validation import clustering_validation
from utils.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

# arcface_torch's optimiser recipe per backbone family (configs/*_r50.py and *_vit_*.py): lr is absolute.
IRESNET_RECIPE = {"opt": "sgd", "lr_base": 0.1, "weight_decay": 5e-4}
VIT_RECIPE = {"opt": "adamw", "lr_base": 1e-3, "weight_decay": 0.1}


@register_method
class RecognitionMethod(Method):
    """Margin-softmax identity classification; a GFD benchmark trains on D_L and validates by clustering."""

    name = "recognition"
    config_class = RecognitionConfig
    summary = (
        "margin-softmax identity classification (ArcFace, CosFace, AdaFace, GB-CosFace over Partial FC): the "
        "ArcFace baseline on a benchmark's labelled identities, or a whole recognition_folders/recognition_recordio "
        "set; Part fViT with --landmark-cnn; TransFace with --arch transface_vit_t/s/b/l --dpap --ehsm"
    )
    archs = VIT_ARCHS + IRESNET_ARCHS + TRANSFACE_ARCHS
    lr_scaling = "none"
    recipe = {
        "arch": "iresnet50",
        "input_preset": "face",
        **IRESNET_RECIPE,
        "momentum": 0.9,
        "epochs": 20,
        "warmup_epochs": 0,
        "warmup_lr": 0.0,
        "min_lr": 0.0,
        "clip_grad": 5.0,
        "batch_size": 128,
    }

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "Recognition (--method recognition)",
            "Recipe (arcface_torch): IResNets SGD lr 0.1, weight decay 5e-4, no warm-up; ViTs AdamW lr 1e-3, weight "
            "decay 0.1, warm-up over a tenth of the epochs; the backbone's gradient clipped to norm 5; the face input "
            "preset. --lr-base is the learning rate itself (not scaled with the batch), as arcface_torch's lr is.",
        )
        group.add_argument(
            "--head", choices=tuple(MARGIN_HEADS), default="arcface", help="margin head (default: %(default)s)"
        )
        group.add_argument(
            "--head-args",
            nargs="*",
            type=parse_head_arg,
            default=[],
            metavar="NAME=VALUE",
            help="overrides of the head's defaults, e.g. s=64 m2=0.5 (names: the head class's arguments) "
            "(default: none)",
        )
        group.add_argument(
            "--sample-rate",
            type=float,
            default=1.0,
            help="Partial FC: fraction of each rank's class centres in the softmax, positives always kept "
            "(default: %(default)s)",
        )
        group.add_argument("--embedding-size", type=int, default=512, help="embedding dimension (default: %(default)s)")
        group.add_argument(
            "--dropout", type=float, default=0.0, help="IResNet dropout before the feature layer (default: %(default)s)"
        )
        group.add_argument(
            "--grad-from-block",
            "--grad_from_block",
            dest="grad_from_block",
            type=int,
            default=0,
            help="registered ViTs: first trained block; the patch embedding, tokens, earlier blocks, final norm and a "
            "--landmark-cnn front end stay frozen, as FaceGCD's --grad-from-block; 0 trains the whole backbone "
            "(default: %(default)s)",
        )
        group.add_argument(
            "--landmark-regularisation",
            action="store_true",
            help="with --landmark-cnn (Part fViT): LAFS fine-tuning, the learned landmarks are pulled towards those "
            "of the initial --landmark-weights by an MSE weighted 1000/100/1/0.11/0 over epochs 0-7/8-13/14-20/21-27/"
            "28+ (default: off)",
        )
        group.add_argument(
            "--weight-decay-on",
            choices=WEIGHT_DECAY_SCOPES,
            default=None,
            help="parameters with weight decay: matrices (>= 2-D weights, not position embeddings or tokens) or all "
            "(default: all for TransFace backbones, as released; matrices otherwise)",
        )
        _add_transface_args(parser)
        add_landmark_args(
            parser,
            switch=True,
            help_weights="initial landmark CNN of Part fViT in the reference key format; random when the file does "
            "not exist (default: %(default)s)",
        )

    @classmethod
    def resolve_args(cls, args: argparse.Namespace, explicit: set[str]) -> None:
        transface = args.arch in TRANSFACE_ARCHS
        if args.weight_decay_on is None:
            args.weight_decay_on = "all" if transface else "matrices"
        if transface:
            if "patch_size" in explicit and args.patch_size != PATCH:
                raise ValueError(f"--patch-size {args.patch_size}: TransFace backbones use {PATCH} x {PATCH} patches")
            args.patch_size = PATCH
            if "sched" not in explicit:
                args.sched = "poly"  # the release's polynomial (power 2) decay after the warm-up
        if args.arch not in IRESNET_ARCHS:
            for dest, value in VIT_RECIPE.items():
                if dest not in explicit:
                    setattr(args, dest, value)
            if "warmup_epochs" not in explicit:
                args.warmup_epochs = args.epochs // 10

    @classmethod
    def build(cls, args: argparse.Namespace, image_size: int) -> MethodSetup:
        if args.dataset in RECOGNITION_SETS:
            data = identity_training_set(args.dataset, recognition_data_path(args), image_size, args.input_preset)
            settings = data.facts
        else:
            datasets = load_datasets(args, image_size)
            data = labelled_training_set(datasets, image_size, args.input_preset)
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
            grad_from_block=args.grad_from_block,
            input_preset=args.input_preset,
            weight_decay_on=args.weight_decay_on,
            drop_path=args.transface_drop_path,
            mask_ratio=args.transface_mask_ratio,
            release_masking=args.transface_release_masking,
            dpap=args.dpap,
            dpap_prob=args.dpap_prob,
            dpap_patches=args.dpap_patches,
            dpap_train_mode_ranking=args.dpap_train_mode_ranking,
            ehsm=args.ehsm,
            ehsm_gamma=args.ehsm_gamma,
            ehsm_topk=args.ehsm_topk,
            ehsm_normalise=args.ehsm_normalise,
        )
        model = build_recognizer(
            config, args.pretrained_weights, args.checkpoint_key, weights_only=not args.unsafe_load
        )
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
            **clustering_validation(gcd),
            description=f"{args.dataset}: {data.num_classes} identities, {len(data.train)} training images"
            + ("" if gcd is None else f" (the labelled subset D_L; validation clusters {gcd.num_classes} classes)"),
        )

    @classmethod
    def load_for_embedding(
        cls, ckpt: dict[str, Any], path: str | Path, *, weights_only: bool, flags: argparse.Namespace | None = None
    ) -> FaceRecognizer:
        return recognizer_from_checkpoint(ckpt, path)


def _add_transface_args(parser: argparse.ArgumentParser) -> None:
    """TransFace's backbone options and its two training switches, DPAP and EHSM (docs/transface.md)."""
    group = parser.add_argument_group(
        "TransFace (--arch transface_vit_t/s/b/l)",
        "TransFace's patch-9 ViTs with a token gate; DPAP perturbs the amplitude spectrum of each selected image's "
        "highest-gated patches, EHSM weights each sample's cross-entropy by 1 + exp(-gamma * mean token std). "
        "Recipe: AdamW lr 1e-3, weight decay 0.1 on all parameters, warm-up over a tenth of the epochs then the poly "
        "schedule (--sched poly), ArcFace s=64 m=0.5, the face preset.",
    )
    group.add_argument(
        "--transface-drop-path",
        type=float,
        default=None,
        help="drop path rate of the blocks (default: the variant's released rate, 0.05)",
    )
    group.add_argument(
        "--transface-mask-ratio",
        type=float,
        default=None,
        help="fraction of the tokens masked in training (default: the variant's released ratio: 0 for t and s, "
        "0.05 for b and l)",
    )
    group.add_argument(
        "--transface-release-masking",
        action="store_true",
        help="mask 10%% of the tokens whenever the mask ratio is > 0, as the release does (default: off, the ratio "
        "is honoured)",
    )
    group.add_argument("--dpap", action="store_true", help="dominant patch amplitude perturbation (default: off)")
    group.add_argument(
        "--dpap-prob", type=float, default=0.2, help="DPAP: probability a sample is perturbed (default: %(default)s)"
    )
    group.add_argument(
        "--dpap-patches",
        type=int,
        default=7,
        help="DPAP: highest-gated patches perturbed per selected sample (default: %(default)s)",
    )
    group.add_argument(
        "--dpap-train-mode-ranking",
        action="store_true",
        help="DPAP: rank the patches with the backbone in training mode (masking, drop path, BatchNorm statistics "
        "updated), as the release does (default: off, evaluation mode)",
    )
    group.add_argument(
        "--ehsm", action="store_true", help="entropy-guided hard sample mining loss weights (default: off)"
    )
    group.add_argument(
        "--ehsm-gamma", type=float, default=1.0, help="EHSM: gamma of 1 + exp(-gamma * E) (default: %(default)s)"
    )
    group.add_argument(
        "--ehsm-topk",
        type=int,
        default=0,
        help="EHSM: E averages each sample's K largest token stds; 0 for all tokens, as released (default: "
        "%(default)s)",
    )
    group.add_argument(
        "--ehsm-normalise",
        choices=WEIGHT_NORMALISATIONS,
        default="batch",
        help="EHSM: divide the weighted loss by the batch size (batch, as released) or by the sum of the weights "
        "(default: %(default)s)",
    )


def _initial_landmarks(model: FaceRecognizer, args: argparse.Namespace) -> None:
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
