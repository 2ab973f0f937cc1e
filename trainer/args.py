"""Argument groups shared by train.py, extract_features.py and SSK.py.

Flag spellings follow the reference release; where it used underscores, both spellings map to one argument.
"""

from __future__ import annotations

import argparse
import copy
import logging

from model.facegcd import ModelConfig
from model.landmark import LANDMARK_ORIENTATIONS, REFERENCE_LANDMARK_PATH

logger = logging.getLogger(__name__)

ARCHS = ("vit_tiny", "vit_small", "vit_base")
RECOGNITION_ARCHS = ARCHS + ("iresnet18", "iresnet34", "iresnet50", "iresnet100")
METHODS = ("facegcd", "recognition", "dino", "lafs")


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
        help="pin host memory (only has an effect on CUDA)",
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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Backbone, prefix generator and head flags (docs/method.md, section 5)."""
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--arch",
        "--model",
        dest="arch",
        default="vit_base",
        choices=RECOGNITION_ARCHS,
        help="backbone: a ViT variant; IResNets with --method recognition only (default: %(default)s)",
    )
    group.add_argument(
        "--patch_size",
        "--patch-size",
        dest="patch_size",
        type=int,
        default=8,
        help="ViT patch size (default: 8, the paper's ViT-B/8)",
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
        "--prefix_length",
        "--prefix-length",
        dest="prefix_length",
        type=int,
        default=10,
        help="prefix tokens per block; 0 = plain GCD baseline (default: 10)",
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
        help="base prompt: fresh U(-1,1) each training forward, or zeros (default: uniform)",
    )
    group.add_argument(
        "--eval-prompt",
        "--eval_prompt",
        dest="eval_prompt",
        choices=("fixed", "resample"),
        default="fixed",
        help="evaluation base prompt: fixed buffer or reference resampling",
    )
    group.add_argument(
        "--grad-from-block",
        "--grad_from_block",
        dest="grad_from_block",
        type=int,
        default=11,
        help="train backbone blocks with index >= this; 0 trains all (default: 11)",
    )
    group.add_argument(
        "--head-out-dim",
        dest="head_out_dim",
        type=int,
        default=65536,
        help="width of the DINO head's last layer (default: 65536)",
    )
    group.add_argument(
        "--hypernet-hidden-dim",
        dest="hypernet_hidden_dim",
        type=int,
        default=1024,
        help="hidden width of the HyperNets' weight and bias generators (default: 1024)",
    )
    group.add_argument("--freeze", nargs="*", default=(), help="extra parameter-name prefixes to freeze")
    group.add_argument(
        "--pretrained_weights",
        "--pretrained-weights",
        dest="pretrained_weights",
        default=None,
        help="DINO/timm backbone weights (local file; nothing is downloaded)",
    )
    group.add_argument(
        "--checkpoint_key",
        "--checkpoint-key",
        dest="checkpoint_key",
        default="teacher",
        help="key of the state dict inside a DINO checkpoint (default: teacher)",
    )
    group.add_argument("--grad-checkpointing", action="store_true", help="per-block activation checkpointing")
    group.add_argument(
        "--landmark_cnn",
        "--landmark-cnn",
        dest="landmark_cnn",
        action="store_true",
        help="landmark front end: a frozen landmark CNN turns each image into a mosaic of landmark-centred patches "
        "for both ViT passes (training reads --landmark-weights; extraction and SSK take the CNN from the "
        "checkpoint and must be given the flag exactly when the checkpoint has the front end)",
    )
    group.add_argument(
        "--landmark-weights",
        default=REFERENCE_LANDMARK_PATH,
        help="landmark CNN weights in the reference key format (stn.*, output.*) (default: %(default)s)",
    )
    group.add_argument(
        "--landmark-tiles",
        choices=LANDMARK_ORIENTATIONS,
        default="natural",
        help="mosaic tile orientation: natural, or reference (the reference's transposed tiles) (default: natural)",
    )


def _head_arg(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head-args expects NAME=NUMBER items such as s=64 or m2=0.5, got {text!r}")


def add_recognition_args(parser: argparse.ArgumentParser) -> None:
    """The training method and the margin-softmax recognition flags (docs/recognition.md)."""
    group = parser.add_argument_group("Method")
    group.add_argument(
        "--method",
        choices=METHODS,
        default="facegcd",
        help="facegcd (prefix-tuned ViT, GCD losses), recognition (margin-softmax identity classification on the "
        "labelled identities: the ArcFace baseline, or a whole --dataset recognition_folders/recognition_recordio "
        "set), dino (self-supervised pretraining on every training image, labels unused; writes the DINO "
        "checkpoint.pth that --pretrained_weights loads) or lafs (dino on the landmark mosaics of the frozen "
        "--landmark-weights CNN; also writes that CNN as landmark_cnn.pth) (default: facegcd)",
    )
    group = parser.add_argument_group("Recognition (--method recognition)")
    group.add_argument(
        "--head",
        choices=("arcface", "cosface", "sphereface", "combined", "adaface", "gbcosface"),
        default="arcface",
        help="margin head (default: arcface)",
    )
    group.add_argument(
        "--head-args",
        nargs="*",
        type=_head_arg,
        default=[],
        metavar="NAME=VALUE",
        help="overrides of the head's defaults, e.g. s=64 m2=0.5 (names: the head class's arguments)",
    )
    group.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="Partial FC: fraction of each rank's class centres in the softmax, positives always kept (default: 1)",
    )
    group.add_argument("--embedding-size", type=int, default=512, help="embedding dimension (default: 512)")
    group.add_argument(
        "--landmark-regularisation",
        action="store_true",
        help="with --landmark_cnn (Part fViT): LAFS fine-tuning, the learned landmarks are pulled towards those of "
        "the initial --landmark-weights by an MSE weighted 1000/100/1/0.11/0 over epochs 0-7/8-13/14-20/21-27/28+",
    )
    group.add_argument("--dropout", type=float, default=0.0, help="IResNet dropout before the feature layer")
    group.add_argument(
        "--val-targets",
        nargs="*",
        default=[],
        help="verification sets validated with the clustering: insightface .bin pair sets (lfw.bin, ...) and IJB "
        "folders (holding meta/ and loose_crop/)",
    )


def add_ssl_args(parser: argparse.ArgumentParser) -> None:
    """DINO pretraining flags (``--method dino``; DINO's ``main_dino.py`` names and defaults, LAFS values noted)."""
    group = parser.add_argument_group("Self-supervised pretraining (--method dino / lafs)")
    group.add_argument("--local-crops-number", type=int, default=8, help="local views per image (default: 8)")
    group.add_argument(
        "--local-crops-size",
        type=int,
        default=None,
        help="local view side in pixels (default: 48 for dino, DINO's 96/224; the image size for lafs)",
    )
    group.add_argument(
        "--global-crops-scale", type=float, nargs=2, default=(0.4, 1.0), help="global crop area range (0.4 1)"
    )
    group.add_argument(
        "--local-crops-scale", type=float, nargs=2, default=(0.05, 0.4), help="local crop area range (0.05 0.4)"
    )
    group.add_argument("--momentum-teacher", type=float, default=0.996, help="teacher EMA start, cosine to 1")
    group.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at epoch 0")
    group.add_argument("--teacher-temp", type=float, default=0.04, help="teacher temperature after the warm-up")
    group.add_argument(
        "--warmup-teacher-temp-epochs", type=int, default=0, help="teacher temperature warm-up (LAFS: 30, 0.07->0.04)"
    )
    group.add_argument("--weight-decay-end", type=float, default=0.4, help="weight decay at the end (cosine)")
    group.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with the head's last layer frozen")
    group.add_argument(
        "--landmark-jitter", type=float, default=5.0, help="lafs: Gaussian jitter std of every landmark in pixels (5)"
    )
    group.add_argument(
        "--local-landmarks",
        type=int,
        default=36,
        help="lafs: landmarks a local view keeps, a square number (default: 36, a 6 x 6 mosaic)",
    )


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
        help="autocast dtype (default: float16 on CUDA, bfloat16 on the CPU, which autocasts only where it computes "
        "bfloat16 natively and runs float32 otherwise)",
    )
    group.add_argument(
        "--amp-impl",
        "--amp_impl",
        dest="amp_impl",
        choices=("native", "apex"),
        default="native",
        help="native = torch.amp; apex = the reference's O0 setting, i.e. FP32 (default: native)",
    )
    group.add_argument("--experiment", default="", help="run name; folder under the output root")


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
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))


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
