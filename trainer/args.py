"""Argument groups shared by the scripts (train.py, extract_features.py, SSK.py); each method adds its own group.

Hyphenated spellings are canonical; where the reference release used underscores, that spelling is a hidden alias
of the same argument (``utils.config.hide_alias_spellings``), so its documented commands run verbatim.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable

from model.landmark import LANDMARK_ORIENTATIONS, REFERENCE_LANDMARK_PATH
from trainer.optim import SUPPORTED_OPTIMIZERS, SUPPORTED_SCHEDULERS
from utils.config import parse_args_with_config
from utils.presets import INPUT_PRESETS

logger = logging.getLogger(__name__)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Dataset, split and loader flags."""
    group = parser.add_argument_group("Dataset")
    group.add_argument("--dataset", default="synthfaces_tiny", help="registered benchmark name (default: %(default)s)")
    group.add_argument(
        "--data-path",
        "--data_path",
        "--data-dir",
        dest="data_path",
        default=None,
        help="benchmark root holding train/ and test/ (default: data/<dataset>)",
    )
    group.add_argument(
        "--prop-train-labels",
        "--prop_train_labels",
        dest="prop_train_labels",
        type=float,
        default=0.5,
        help="fraction of known-class training images that carry labels (default: 0.5)",
    )
    group.add_argument(
        "--split-seed",
        "--split_seed",
        dest="split_seed",
        type=int,
        default=0,
        help="seed of the labelled-subset draw, np.random.RandomState(seed) as in GCD (default: 0)",
    )
    group.add_argument(
        "--num-known",
        "--num_known",
        dest="num_known",
        type=int,
        default=None,
        help="number of known (old) classes, the first ones in sorted folder order; only identity_folders sets it "
        "freely (default: the benchmark's, N // 2)",
    )
    group.add_argument(
        "--input-preset",
        choices=INPUT_PRESETS,
        default=None,
        help="image preset: gcd (resize to S/0.875, random/centre crop S, ImageNet mean/std; GCD's and FaceGCD's) or "
        "face (the whole aligned crop, flip, (x/255 - 0.5)/0.5; insightface's); stored in the checkpoint (default: the "
        "method's recipe when training, the checkpoint's in extraction and SSK)",
    )
    group.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip unreadable images (listed in the log) instead of stopping (default: stop)",
    )
    group.add_argument(
        "-b",
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=128,
        help="images per process and step (default: 128)",
    )
    group.add_argument(
        "-j",
        "--workers",
        "--num_workers",
        dest="workers",
        type=int,
        default=4,
        help="DataLoader worker processes per rank (default: 4)",
    )
    group.add_argument(
        "--pin-mem",
        "--pin_mem",
        dest="pin_mem",
        action="store_true",
        default=None,
        help="pin the training loader's host memory, so copies to the GPU overlap with compute (default: on when the "
        "device is CUDA; pinning has no effect elsewhere)",
    )
    group.add_argument(
        "--no-pin-mem",
        dest="pin_mem",
        action="store_false",
        default=None,
        help="do not pin the training loader's host memory on CUDA",
    )


def add_checkpoint_data_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the scripts that read their data settings from a trained checkpoint (extraction, SSK)."""
    group = parser.add_argument_group("Data settings from the checkpoint")
    group.add_argument(
        "--data-relocated",
        action="store_true",
        help="the benchmark was moved: accept a --data-path other than the checkpoint's (the listing must still "
        "match the one used in training)",
    )


def add_backbone_args(parser: argparse.ArgumentParser, archs: tuple[str, ...], default_arch: str) -> None:
    """Backbone, input and weight-loading flags every method shares (``archs``: the method's ``--arch`` values)."""
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--arch",
        "--model",
        dest="arch",
        default=default_arch,
        choices=archs,
        help="backbone (default: %(default)s)",
    )
    group.add_argument(
        "--patch-size",
        "--patch_size",
        dest="patch_size",
        type=int,
        default=8,
        help="ViT patch size (default: %(default)s, the paper's ViT-B/8)",
    )
    group.add_argument(
        "--input-size",
        "--input_size",
        dest="input_size",
        type=int,
        nargs=3,
        default=(3, 112, 112),
        metavar=("C", "H", "W"),
        help="input shape, square images only (default: 3 112 112)",
    )
    group.add_argument(
        "--pretrained-weights",
        "--pretrained_weights",
        dest="pretrained_weights",
        default=None,
        help="backbone weights, a local file (nothing is downloaded): DINO/timm weights or a --method recognition "
        "ViT checkpoint (last.pth.tar) for a ViT, an arcface_torch backbone.pth for an IResNet, a TransFace model.pt "
        "for a transface_vit (default: random initialisation)",
    )
    group.add_argument(
        "--checkpoint-key",
        "--checkpoint_key",
        dest="checkpoint_key",
        default="teacher",
        help="key of the state dict inside a DINO checkpoint (default: %(default)s)",
    )
    group.add_argument(
        "--grad-checkpointing", action="store_true", help="per-block activation checkpointing (default: off)"
    )


def add_landmark_args(parser: argparse.ArgumentParser, *, switch: bool, help_weights: str) -> None:
    """The landmark front end's flags (FaceGCD, Part fViT, LAFS); ``switch`` adds ``--landmark-cnn`` itself."""
    group = parser.add_argument_group("Landmark front end")
    if switch:
        group.add_argument(
            "--landmark-cnn",
            "--landmark_cnn",
            dest="landmark_cnn",
            action="store_true",
            help="landmark front end: a landmark CNN turns each image into a mosaic of landmark-centred patches "
            "(default: off)",
        )
    group.add_argument("--landmark-weights", default=REFERENCE_LANDMARK_PATH, help=help_weights)
    group.add_argument(
        "--landmark-tiles",
        choices=LANDMARK_ORIENTATIONS,
        default="natural",
        help="mosaic tile orientation: natural, or reference (the reference's transposed tiles) (default: natural)",
    )


def parse_recording_explicit(
    parser_factory: Callable[[], argparse.ArgumentParser], argv: list[str]
) -> argparse.Namespace:
    """Parse ``argv`` (``-c/--config`` YAML defaults included) and record in ``args.explicit_flags`` the destinations
    the command line set, which extraction and SSK compare with a checkpoint's settings."""
    args = parse_args_with_config(parser_factory(), argv)
    args.explicit_flags = sorted(explicit_dests(parser_factory(), argv))
    return args


def positive_int(text: str) -> int:
    """An integer >= 1 (restart and iteration counts)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_head_arg(text: str) -> tuple[str, float]:
    """One ``NAME=NUMBER`` item of a ``--head-args``-style flag."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER items such as s=64 or m2=0.5, got {text!r}")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """Optimiser and schedule flags; each method's recipe sets their defaults (``Method.recipe``)."""
    group = parser.add_argument_group("Optimiser and schedule (defaults: the method's recipe)")
    group.add_argument(
        "--opt",
        default="sgd",
        type=str.lower,
        choices=SUPPORTED_OPTIMIZERS,
        help="sgd (Nesterov), momentum or adamw (default: %(default)s)",
    )
    group.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: from --lr-base)")
    group.add_argument(
        "--lr-base",
        "--lr_base",
        dest="lr_base",
        type=float,
        default=0.1,
        help="base learning rate, scaled with the global batch by the method's rule (default: %(default)s)",
    )
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    group.add_argument(
        "--weight-decay",
        "--weight_decay",
        dest="weight_decay",
        type=float,
        default=2e-5,
        help="weight decay on >= 2-D parameters (default: %(default)s)",
    )
    group.add_argument("--epochs", type=int, default=100, help="training epochs (default: %(default)s)")
    group.add_argument(
        "--warmup-epochs",
        "--warmup_epochs",
        dest="warmup_epochs",
        type=int,
        default=5,
        help="linear warm-up epochs (default: %(default)s)",
    )
    group.add_argument(
        "--warmup-lr",
        "--warmup_lr",
        dest="warmup_lr",
        type=float,
        default=1e-5,
        help="warm-up start lr (default: %(default)s)",
    )
    group.add_argument(
        "--min-lr", "--min_lr", dest="min_lr", type=float, default=0.0, help="cosine floor (default: %(default)s)"
    )
    group.add_argument(
        "--sched",
        default="cosine",
        choices=SUPPORTED_SCHEDULERS,
        help="lr schedule after the warm-up: cosine to --min-lr, step (x --decay-rate at each of "
        "--decay-milestones), or poly ((1 - progress)^2 to --min-lr, set before every optimiser step; TransFace) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--decay-milestones",
        type=int,
        nargs="+",
        default=[],
        help="--sched step: epochs at which the lr is multiplied by --decay-rate (GB-CosFace: 5 10 15 20 of 24) "
        "(default: none)",
    )
    group.add_argument(
        "--decay-rate", type=float, default=0.1, help="--sched step: lr factor at each milestone (default: %(default)s)"
    )
    group.add_argument(
        "--grad-accum-steps",
        "--grad_accum_steps",
        dest="grad_accum_steps",
        type=int,
        default=1,
        help="micro-batches per optimiser step; when the steps per epoch are not a multiple of it, the epoch's last, "
        "shorter group still steps, on the mean gradient of the micro-batches it holds (default: %(default)s)",
    )
    group.add_argument(
        "--clip-grad",
        "--clip_grad",
        dest="clip_grad",
        type=float,
        default=None,
        help="max gradient norm over the parameters the method clips; 0 turns off a recipe's clipping (default: "
        "%(default)s)",
    )


def add_validation_args(parser: argparse.ArgumentParser) -> None:
    """Validation, checkpoint and resume flags."""
    group = parser.add_argument_group("Validation and checkpoints")
    group.add_argument(
        "--val-interval",
        "--val_interval",
        dest="val_interval",
        type=int,
        default=10,
        help="validate when (epoch + 1) %% this == 0, and after the last epoch (default: %(default)s)",
    )
    group.add_argument(
        "--eval-funcs",
        "--eval_funcs",
        dest="eval_funcs",
        nargs="+",
        default=["v2", "v1"],
        choices=("v1", "v2"),
        help="metric variants; the first selects model_best (default: v2 v1)",
    )
    group.add_argument(
        "--checkpoint-select",
        choices=("best", "last"),
        default="best",
        help="model_best.pth.tar = the last validated epoch (last; the recipes' choice), or the best validation "
        "accuracy (best, reproduces the reference: it reads the ground truth of the unlabelled images and of the test "
        "split, which GCD assumes unknown, so its numbers are optimistic) (default: %(default)s)",
    )
    group.add_argument(
        "--select-on",
        choices=("combined", "unlabelled"),
        default="combined",
        help="with --checkpoint-select best: select on the mean of D_U and test, or on D_U only; both read "
        "unlabelled ground truth (default: %(default)s)",
    )
    group.add_argument(
        "--val-kmeans-restarts",
        "--val-kmeans-init",
        dest="val_kmeans_restarts",
        type=positive_int,
        default=10,
        help="validation k-means restarts (default: %(default)s)",
    )
    group.add_argument(
        "--val-kmeans-iter", type=int, default=300, help="validation k-means iterations (default: %(default)s)"
    )
    group.add_argument(
        "--val-targets",
        nargs="*",
        default=[],
        help="verification sets validated with the clustering: insightface .bin pair sets (lfw.bin, ...) and IJB "
        "folders (holding meta/ and loose_crop/) (default: none)",
    )
    group.add_argument(
        "--exact-roc",
        action="store_true",
        help="IJB TAR@FAR on the exact ROC instead of insightface's thinned one (sklearn's drop_intermediate) "
        "(default: off)",
    )
    group.add_argument("--checkpoint-hist", type=int, default=10, help="checkpoint-N files kept (default: %(default)s)")
    group.add_argument("--output", default="./output/train", help="output root (default: %(default)s)")
    group.add_argument(
        "--resume", default="", help="checkpoint to resume from (model, optimiser, schedule, RNG) (default: none)"
    )
    group.add_argument(
        "--no-resume-opt", action="store_true", help="with --resume, restore the model only (default: off)"
    )
    group.add_argument(
        "--initial-checkpoint", default="", help="load model weights only from this checkpoint (default: none)"
    )
    group.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load checkpoints with weights_only=False (only for files you trust) (default: off)",
    )


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """Logging flags."""
    group = parser.add_argument_group("Logging")
    group.add_argument("--log-interval", type=int, default=50, help="steps between log lines (default: %(default)s)")
    group.add_argument("--log-wandb", action="store_true", help="log to wandb (offline without an API key)")
    group.add_argument(
        "--wandb-project", default="GCD_base_prefix_gen", help="wandb project of --log-wandb (default: %(default)s)"
    )
    group.add_argument("--save-images", action="store_true", help="save input grids at log steps (default: off)")
    group.add_argument("--no-progress", action="store_true", help="no tqdm bars (default: bars on)")
    group.add_argument("--no-ddp-bb", action="store_true", help="DDP broadcast_buffers=False (default: off)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Device, precision, seeds and output locations."""
    group = parser.add_argument_group("Runtime")
    group.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    group.add_argument("--seed", type=int, default=42, help="global seed (default: 42)")
    group.add_argument("--amp", action="store_true", help="mixed precision with torch.amp")
    group.add_argument(
        "--amp-dtype",
        "--amp_dtype",
        dest="amp_dtype",
        choices=("float16", "bfloat16"),
        default=None,
        help="autocast dtype (default: bfloat16 on a CUDA GPU that computes it natively (compute capability 8.0 and "
        "later), float16 with a gradient scaler on older GPUs; bfloat16 on the CPU, which autocasts only where it "
        "computes bfloat16 natively and runs float32 otherwise)",
    )
    group.add_argument(
        "--amp-impl",
        "--amp_impl",
        dest="amp_impl",
        choices=("native", "apex"),
        default="native",
        help="native = torch.amp; apex = the reference's O0 setting, i.e. FP32 (default: native)",
    )
    group.add_argument(
        "--experiment",
        default="",
        help="run name; folder under the output root (default: <date>-<time>-<arch>-patch<patch size>-<image size>)",
    )


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    """Flags kept only so that the reference commands run verbatim; they have no effect (logged once)."""
    group = parser.add_argument_group("Compatibility (accepted, no effect)")
    for flag in (
        "--pretrained",
        "--return-embed",
        "--prefix_tuning",
        "--sync-bn",
        "--dist-bn-off",
        "--synchronize-step",
        "--no-prefetcher",
        "--torchscript",
        "--channels-last",
        "--use-multi-epochs-loader",
    ):
        group.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in (
        "--color-jitter",
        "--aa",
        "--reprob",
        "--remode",
        "--recount",
        "--mixup",
        "--cutmix",
        "--smoothing",
        "--drop",
        "--drop-path",
        "--dist-bn",
        "--local_rank",
        "--local-rank",
    ):
        group.add_argument(flag, default=None, help=argparse.SUPPRESS)


COMPAT_FLAGS = (
    "pretrained",
    "return_embed",
    "prefix_tuning",
    "sync_bn",
    "dist_bn_off",
    "synchronize_step",
    "no_prefetcher",
    "torchscript",
    "channels_last",
    "use_multi_epochs_loader",
    "color_jitter",
    "aa",
    "reprob",
    "remode",
    "recount",
    "mixup",
    "cutmix",
    "smoothing",
    "drop",
    "drop_path",
    "dist_bn",
)


def log_ignored_flags(args: argparse.Namespace) -> None:
    """Log once which compatibility-only flags were given."""
    given = [name for name in COMPAT_FLAGS if getattr(args, name, None) not in (None, False)]
    if given:
        logger.info("compatibility flags accepted without effect: %s", ", ".join("--" + g for g in given))


def image_size_from_args(args: argparse.Namespace) -> int:
    """The square image size from ``--input-size C H W``; rejects non-square or non-RGB shapes."""
    channels, height, width = args.input_size
    if channels != 3 or height != width:
        raise ValueError(f"--input-size {channels} {height} {width}: expected 3 S S (RGB, square images)")
    return height


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options that ``argv`` sets explicitly (whatever their value)."""
    probe = copy.deepcopy(parser)
    probe._defaults.clear()  # set_defaults() values (a method's recipe, a config file) are not given on the line
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))
