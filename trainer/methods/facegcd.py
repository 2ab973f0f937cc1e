"""FaceGCD (``--method facegcd``): a prefix-tuned ViT with a HyperNetwork prefix generator, trained with InfoNCE +
SupCon on D_L ++ D_U (docs/method.md). Its recipe is the reference release's; its commands run verbatim."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_loader.recognition import RECOGNITION_SETS
from data_loader.sampler import BalancedSampler
from model.facegcd import FaceGCD, ModelConfig, build_facegcd, load_facegcd_checkpoint
from trainer.args import add_landmark_args, image_size_from_args
from trainer.data import data_config, load_datasets
from trainer.methods.base import Method, MethodSetup, register_method
from trainer.validation import clustering_validation


def add_facegcd_model_args(parser: argparse.ArgumentParser) -> None:
    """The prefix generator's and head's flags, and the landmark front end (docs/method.md, section 5)."""
    group = parser.add_argument_group("FaceGCD model (--method facegcd)")
    group.add_argument(
        "--prefix-length",
        "--prefix_length",
        dest="prefix_length",
        type=int,
        default=10,
        help="prefix tokens per block; 0 = plain GCD baseline (default: %(default)s)",
    )
    group.add_argument(
        "--layer-embed",
        "--layer_embed",
        dest="layer_embed",
        action="store_true",
        help="HyperNetwork input = [token mean ; layer embedding] (default: off)",
    )
    group.add_argument(
        "--initializer",
        choices=("uniform", "zero"),
        default="uniform",
        help="base prompt: fresh U(-1,1) each training forward, or zeros (default: %(default)s)",
    )
    group.add_argument(
        "--eval-prompt",
        "--eval_prompt",
        dest="eval_prompt",
        choices=("fixed", "resample"),
        default="fixed",
        help="evaluation base prompt: fixed buffer or reference resampling (default: %(default)s)",
    )
    group.add_argument(
        "--depth",
        type=int,
        default=12,
        help="ViT blocks; fewer than the arch's 12 gives a shallower ViT of its width, trained from scratch or from "
        "a checkpoint of that depth (default: %(default)s)",
    )
    group.add_argument(
        "--grad-from-block",
        "--grad_from_block",
        dest="grad_from_block",
        type=int,
        default=11,
        help="train backbone blocks with index >= this; 0 trains all (default: %(default)s)",
    )
    group.add_argument(
        "--head-out-dim",
        dest="head_out_dim",
        type=int,
        default=65536,
        help="width of the DINO projection head's last layer (default: %(default)s)",
    )
    group.add_argument(
        "--hypernet-hidden-dim",
        dest="hypernet_hidden_dim",
        type=int,
        default=1024,
        help="hidden width of the HyperNets' weight and bias generators (default: %(default)s)",
    )
    group.add_argument(
        "--freeze", nargs="*", default=(), help="extra parameter-name prefixes to freeze (default: none)"
    )
    add_landmark_args(
        parser,
        switch=True,
        help_weights="landmark CNN weights in the reference key format (stn.*, output.*), read by a --landmark-cnn "
        "training; extraction and SSK take the CNN from the checkpoint (default: %(default)s)",
    )


def add_facegcd_loss_args(parser: argparse.ArgumentParser) -> None:
    """The losses' and the sampler's flags."""
    group = parser.add_argument_group("FaceGCD losses and sampler (--method facegcd)")
    group.add_argument("--temperature", type=float, default=1.0, help="InfoNCE temperature (default: %(default)s)")
    group.add_argument(
        "--sup-con-weight",
        "--sup_con_weight",
        dest="sup_con_weight",
        type=float,
        default=0.35,
        help="weight of SupCon; InfoNCE gets 1 - this (default: %(default)s)",
    )
    group.add_argument(
        "--contrast-unlabel-only",
        "--contrast_unlabel_only",
        dest="contrast_unlabel_only",
        action="store_true",
        help="InfoNCE over unlabelled samples only (default: off)",
    )
    group.add_argument(
        "--not-contrastive",
        "--not_contrastive",
        dest="not_contrastive",
        action="store_true",
        help="rejected: the reference's non-contrastive path is broken (docs/decisions.md, part B)",
    )
    group.add_argument(
        "--sampler",
        choices=("distributed", "reference"),
        default="distributed",
        help="one global epoch over all ranks, or the reference's full epoch per rank (default: %(default)s)",
    )


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The ``ModelConfig`` described by the model flags (and the loss flags, where the parser has them)."""
    losses = {
        name: getattr(args, name)
        for name in ("temperature", "sup_con_weight", "contrast_unlabel_only")
        if hasattr(args, name)
    }
    return ModelConfig(
        arch=args.arch,
        patch_size=args.patch_size,
        img_size=image_size_from_args(args),
        depth=args.depth,
        prefix_length=args.prefix_length,
        layer_embed=args.layer_embed,
        initializer=args.initializer,
        head_out_dim=args.head_out_dim,
        hypernet_hidden_dim=args.hypernet_hidden_dim,
        grad_from_block=args.grad_from_block,
        eval_prompt=args.eval_prompt,
        seed=args.seed,
        freeze=tuple(args.freeze),
        landmark_cnn=args.landmark_cnn,
        landmark_tiles=args.landmark_tiles,
        **losses,
    )


@register_method
class FaceGCDMethod(Method):
    """FaceGCD on a GFD benchmark: D_L ++ D_U with the balanced sampler, clustering validation on D_U and test."""

    name = "facegcd"
    config_class = ModelConfig
    summary = "prefix-tuned ViT with HyperNetwork prefixes, InfoNCE + SupCon on a GFD benchmark (the paper's method)"
    lr_scaling = "timm"
    recipe = {
        "arch": "vit_base",
        "input_preset": "gcd",
        "opt": "sgd",
        "lr_base": 0.1,
        "momentum": 0.9,
        "weight_decay": 2e-5,
        "epochs": 100,
        "warmup_epochs": 5,
        "warmup_lr": 1e-5,
        "min_lr": 0.0,
        "batch_size": 128,
    }

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        add_facegcd_model_args(parser)
        add_facegcd_loss_args(parser)

    @classmethod
    def add_embedding_args(cls, parser: argparse.ArgumentParser) -> None:
        add_facegcd_model_args(parser)

    @classmethod
    def resolve_args(cls, args: argparse.Namespace, explicit: set[str]) -> None:
        if args.not_contrastive:
            raise ValueError("--not-contrastive is not supported: the reference's non-contrastive trainer is broken")
        if args.dataset in RECOGNITION_SETS:
            raise ValueError(f"--dataset {args.dataset} has no GCD split; it trains with --method recognition")
        if args.grad_from_block > 0 and not (args.pretrained_weights or args.resume or args.initial_checkpoint):
            raise ValueError(
                f"--grad-from-block {args.grad_from_block} without --pretrained-weights would train the prefixes over "
                f"a frozen random ViT (blocks 0..{args.grad_from_block - 1} stay at their random initialisation); "
                "pass --pretrained-weights with DINO weights, or --grad-from-block 0 to train every block from scratch"
            )

    @classmethod
    def build(cls, args: argparse.Namespace, image_size: int) -> MethodSetup:
        datasets = load_datasets(args, image_size)
        model = cls.untrained_model(args)
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
            model_config=model.cfg.to_dict(),
            train_set=datasets.train,
            sampler=BalancedSampler(labelled, seed=args.seed, mode=args.sampler),
            data_config=data_config(args, datasets, image_size),
            **clustering_validation(datasets),
            description=(
                f"{args.dataset}: {datasets.num_classes} classes ({datasets.num_known} known), "
                f"{int(datasets.labelled_mask.sum())} labelled + {len(datasets.unlabelled_eval)} unlabelled training "
                f"images, {len(datasets.test_eval)} test images"
            ),
        )

    @classmethod
    def untrained_model(cls, flags: argparse.Namespace) -> FaceGCD:
        return build_facegcd(
            model_config_from_args(flags),
            pretrained_weights=flags.pretrained_weights,
            checkpoint_key=flags.checkpoint_key,
            weights_only=not flags.unsafe_load,
            landmark_weights=flags.landmark_weights if flags.landmark_cnn else None,
        )

    @classmethod
    def load_for_embedding(
        cls, ckpt: dict[str, Any], path: str | Path, *, weights_only: bool, flags: argparse.Namespace | None = None
    ) -> FaceGCD:
        """A FaceGCD or reference checkpoint; without ``model_config`` (the reference's files) the model flags in
        ``flags`` (extraction's, else the defaults) describe what the weights' shapes do not determine."""
        if flags is None:
            model, _ = load_facegcd_checkpoint(path, ModelConfig(), weights_only=weights_only)
            return model
        model, _ = load_facegcd_checkpoint(
            path,
            model_config_from_args(flags),
            pretrained_weights=flags.pretrained_weights,
            checkpoint_key=flags.checkpoint_key,
            weights_only=weights_only,
            landmark_weights=flags.landmark_weights if flags.landmark_cnn else None,
        )
        return model
