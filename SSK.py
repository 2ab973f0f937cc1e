#!/usr/bin/env python3
"""Semi-supervised k-means on extracted features: step 3 of train -> extract -> SSK (docs/method.md, sections 1, 11-12).

Reads ``<save_dir>/<experiment_idx>/features_{train,test}.pt`` (or computes them in memory with
``--checkpoint_weights``), clusters the training features and writes, next to the features it used,
``<save_dir>/<experiment_idx>/ssk/<experiment>/``: ``ssk_results.json``, ``ssk_predictions.pt``,
``ss_kmeans_cluster_centres.pt``, ``tsne_test.png`` and, with ``--K auto``, ``k_estimation.png``. ``--experiment``
names the SSK run within that features folder (``default`` when not given; without ``--experiment_idx`` it names the
features folder and the run is ``default``), so runs on different features never overwrite each other, whatever their
``--experiment``.

The centres file is a dict: the (K, D) ``centres``, ``K``, ``D``, the ``protocol`` and a fingerprint of the training
features they were fitted on (path, rows, sha256 of the float32 bytes). ``--ssk_mode test`` starts from the centres
of the same run folder and refuses them when that fingerprint or the protocol does not match the features being
clustered; a bare (K, D) tensor (the reference's format) is used with a warning, since its origin cannot be checked.

Protocols (``--ssk-protocol``):
- ``gcd`` (default, headline): SS-k-means on all training features with labelled points pinned, scored on the
  unlabelled training images D_U; the test split is assigned to the nearest centre and scored with its own matching.
- ``reference``: plain k-means on all training features, scored over all training images (the reference's SSK).

``--K auto`` first estimates K as GCD does (``utils.k_estimation``): plain k-means of all training features for
candidate Ks in [``--min-classes``, ``--max-classes``] (default [M labelled classes, 2 x the stored number of
identities]), scored by the clustering accuracy of the labelled images only, searched with Brent's method or a peak
bisection (``--k-search``). The chosen and the true K and every evaluated (K, accuracy) go to ``ssk_results.json``
under ``k_estimation``; the run then clusters with the chosen K.

    python SSK.py --save_dir results --experiment_idx run --K 100              # -> results/run/ssk/default/
    python SSK.py --save_dir results --experiment_idx run --K auto --experiment auto  # K estimated first
    torchrun --nproc_per_node=2 SSK.py --save_dir results --experiment_idx run --experiment k100

Under torchrun every rank clusters a contiguous block of the rows; the result equals the single-process run up to
float summation order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import sys
import time
import zipfile
from enum import Enum
from pathlib import Path

import torch

from data_loader import DatasetError
from trainer.args import (
    add_checkpoint_data_args,
    add_compat_args,
    add_data_args,
    add_model_args,
    add_runtime_args,
    explicit_dests,
    log_ignored_flags,
)
from trainer.data import DataConfigError, apply_data_config, labelled_digest
from utils.checkpoint import CheckpointError, atomic_save, atomic_write_text
from utils.config import parse_args_with_config
from utils.distributed import all_gather_variable, cleanup, get_rank, get_world_size, init_distributed, is_primary
from utils.k_estimation import SEARCHES, KEstimate, estimate_k, plot_k_estimation
from utils.kmeans import INITS, KMeansResult, assign_to_centres, contiguous_shard, kmeans, semi_supervised_kmeans
from utils.logging import setup_logging
from utils.evaluation.clustering import MetricVariant, clustering_scores, evaluate_clustering
from utils.report import DEFAULT_RUN, RESULTS_FILE, SSK_SUBDIR, ReportInputError, ssk_run_dir

logger = logging.getLogger("SSK")

SPLITS = ("train", "test")
FEATURE_KEYS = ("features", "labels", "uq_idx", "known_mask", "labelled_mask")
META_KEYS = ("num_classes", "num_known")
CENTRES_FILE = "ss_kmeans_cluster_centres.pt"
CENTRES_KEYS = ("centres", "K", "D", "protocol", "features")
PREDICTIONS_FILE = "ssk_predictions.pt"
TSNE_FILE = "tsne_test.png"
K_ESTIMATION_FILE = "k_estimation.png"
K_ESTIMATION_INIT = 1  # restarts per candidate K: one keeps the search cheap (GCD's sklearn KMeans used 10)
K_ESTIMATION_KEY = "k_estimation"
AUTO_K = "auto"
EVAL_FUNCS = (MetricVariant.V2, MetricVariant.V1, MetricVariant.V2_BALANCED)
CLUSTERING_KEY = "clustering"  # pairwise / BCubed P-R-F, NMI and ARI of each scored set


class Protocol(str, Enum):
    """Which points are clustered and scored (docs/method.md, section 1)."""

    GCD = "gcd"
    REFERENCE = "reference"


class SSKInputError(ValueError):
    """Features, centres or flags that SSK cannot use."""


class MissingInputError(FileNotFoundError):
    """A features or centres file that SSK needs does not exist."""


def int_or_auto(value: str) -> int | str:
    """``--K``: a positive integer or ``auto``."""
    if value.strip().lower() == AUTO_K:
        return AUTO_K
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{AUTO_K}', got {value!r}")
    return k


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The SSK parser; the dataset and model groups matter only when features are computed in memory."""
    parser = argparse.ArgumentParser(
        "FaceGCD semi-supervised k-means",
        add_help=add_help,
        epilog=(
            f"Outputs go to <save_dir>/<experiment_idx>/{SSK_SUBDIR}/<experiment>/ ({RESULTS_FILE}, "
            f"{PREDICTIONS_FILE}, {CENTRES_FILE}, {TSNE_FILE}, with --K auto {K_ESTIMATION_FILE}): --experiment names "
            f"the SSK run on those features ('{DEFAULT_RUN}' when not given). Dataset and model flags are used only "
            "with --checkpoint_weights (features computed in memory)."
        ),
    )
    add_data_args(parser)
    add_checkpoint_data_args(parser)
    add_model_args(parser)
    add_runtime_args(parser)
    group = parser.add_argument_group("Features")
    group.add_argument(
        "--save_dir",
        "--save-dir",
        dest="save_dir",
        default="results",
        help=f"root of the features folders; SSK results go inside them, under {SSK_SUBDIR}/ (default: results)",
    )
    group.add_argument(
        "--experiment_idx",
        "--experiment-idx",
        dest="experiment_idx",
        default="",
        help=(
            "folder under --save_dir holding features_{train,test}.pt; the run's outputs go to its "
            f"{SSK_SUBDIR}/<experiment>/ (default: --experiment, the run then being '{DEFAULT_RUN}')"
        ),
    )
    group.add_argument(
        "--checkpoint_weights",
        "--checkpoint-weights",
        dest="checkpoint_weights",
        default=None,
        help="compute missing features in memory with this checkpoint (as extract_features.py does)",
    )
    group.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load --checkpoint_weights and --pretrained_weights with weights_only=False (only for files you trust)",
    )
    group = parser.add_argument_group("SS-k-means")
    group.add_argument(
        "--K",
        type=int_or_auto,
        default=None,
        help=(
            f"number of clusters, or '{AUTO_K}' to estimate it first (see 'K estimation') (default: the number of "
            "identities stored in the features)"
        ),
    )
    group.add_argument(
        "--max_kmeans_iter",
        "--max-kmeans-iter",
        dest="max_kmeans_iter",
        type=int,
        default=500,
        help="Lloyd iteration cap per restart (default: 500)",
    )
    group.add_argument(
        "--k_means_init",
        "--k-means-init",
        dest="k_means_init",
        type=int,
        default=10,
        help="k-means++ restarts; the lowest inertia wins (default: 10)",
    )
    group.add_argument(
        "--kmeans-init",
        dest="kmeans_init",
        default="k-means++",
        choices=list(INITS),
        help="seeding of each restart: k-means++ (GCD's) or k-means|| (Bahmani et al.) (default: k-means++)",
    )
    group.add_argument(
        "--tol", type=float, default=1e-4, help="stop when (sum of centre shifts)^2 < tol (default: 1e-4)"
    )
    group.add_argument(
        "--ssk-protocol",
        "--ssk_protocol",
        dest="ssk_protocol",
        default=Protocol.GCD.value,
        choices=[p.value for p in Protocol],
        help="gcd: SS-k-means scored on D_U; reference: plain k-means scored on all train images (default: gcd)",
    )
    group.add_argument(
        "--ssk_mode",
        "--ssk-mode",
        dest="ssk_mode",
        default="train",
        choices=("train", "test"),
        help=(
            f"test: start one Lloyd run from the run folder's {CENTRES_FILE}, which must have been fitted on the "
            "same training features with the same protocol (default: train)"
        ),
    )
    group.add_argument(
        "--no-plots",
        "--no_plots",
        dest="no_plots",
        action="store_true",
        help=f"skip the figures ({TSNE_FILE}, {K_ESTIMATION_FILE})",
    )
    group = parser.add_argument_group(
        "K estimation",
        f"used with --K {AUTO_K}: plain k-means of all training features per candidate K, scored on the labelled "
        "images only (GCD's estimator); --max_kmeans_iter, --tol, --kmeans-init and --seed apply to each candidate",
    )
    group.add_argument(
        "--k-search",
        "--k_search",
        dest="k_search",
        default=SEARCHES[0],
        choices=list(SEARCHES),
        help=(
            "brent: bounded Brent search on the rounded K, then a climb to the best neighbour (GCD's default); "
            "binary: bisection on acc(K) vs acc(K + 1) at the midpoint, assuming a unimodal curve (default: brent)"
        ),
    )
    group.add_argument(
        "--min-classes",
        "--min_classes",
        dest="min_classes",
        type=int,
        default=None,
        help="smallest candidate K, at least M (default: the number M of labelled classes)",
    )
    group.add_argument(
        "--max-classes",
        "--max_classes",
        dest="max_classes",
        type=int,
        default=None,
        help=(
            "largest candidate K; give it when the number of identities is unknown (default: 2 x the number of "
            "identities stored in the features, at most the number of training images)"
        ),
    )
    group.add_argument(
        "--k-estimation-init",
        "--k_estimation_init",
        dest="k_estimation_init",
        type=int,
        default=K_ESTIMATION_INIT,
        help=f"k-means restarts per candidate K, seeded by --kmeans-init from --seed (default: {K_ESTIMATION_INIT})",
    )
    add_compat_args(parser)
    return parser


def _torch_load(path: Path, what: str) -> object:
    """``torch.load(weights_only=True)`` on CPU; an unreadable file becomes one ``SSKInputError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise SSKInputError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err


def _load_split(path: Path) -> dict:
    payload = _torch_load(path, "features file")
    if not isinstance(payload, dict):
        raise SSKInputError(f"features file {path} holds a {type(payload).__name__}, expected a dict")
    return payload


def validate_split(payload: dict, source: str) -> dict:
    """Check one split's dict (keys, dtypes, equal lengths, finite features, meta) and return it.

    Args:
        payload: ``{"features", "labels", "uq_idx", "known_mask", "labelled_mask", "meta"}``.
        source: where it came from, for error messages.

    Returns:
        The same dict, features as float32.
    """
    missing = [k for k in (*FEATURE_KEYS, "meta") if k not in payload]
    if missing:
        raise SSKInputError(f"{source} lacks the key(s) {', '.join(missing)}; expected {', '.join(FEATURE_KEYS)}, meta")
    feats = payload["features"]
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or not feats.is_floating_point():
        raise SSKInputError(f"{source}: 'features' must be a 2-D float tensor (N, D)")
    n = feats.shape[0]
    if n == 0:
        raise SSKInputError(f"{source}: 'features' has no row")
    lengths = {k: (len(payload[k]) if isinstance(payload[k], torch.Tensor) else None) for k in FEATURE_KEYS}
    if any(length != n for length in lengths.values()):
        found = ", ".join(f"{k} {v}" for k, v in lengths.items())
        raise SSKInputError(f"{source}: mismatched lengths ({found}); every key must have one entry per image")
    for key, want_bool in (("labels", False), ("uq_idx", False), ("known_mask", True), ("labelled_mask", True)):
        tensor = payload[key]
        ok = tensor.dtype == torch.bool if want_bool else not (tensor.is_floating_point() or tensor.dtype == torch.bool)
        if not ok or tensor.ndim != 1:
            kind = "bool" if want_bool else "integer"
            raise SSKInputError(
                f"{source}: '{key}' must be a 1-D {kind} tensor, got {tensor.dtype} {tuple(tensor.shape)}"
            )
    bad = int((~torch.isfinite(feats)).any(dim=1).sum())
    if bad:
        raise SSKInputError(f"{source}: 'features' has NaN or infinite values in {bad} of {n} rows")
    meta = payload["meta"]
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise SSKInputError(f"{source}: 'meta' must be a dict with {', '.join(META_KEYS)}")
    payload["features"] = feats.float()
    return payload


def _extraction_hint(args: argparse.Namespace, folder: Path) -> str:
    return (
        f"extract them first: torchrun --nproc_per_node=<GPUs> extract_features.py --dataset {args.dataset} "
        f"--data-path <DATA> --checkpoint_weights <model_best.pth.tar> --save_dir {args.save_dir} "
        f"--experiment {folder}, or pass --checkpoint_weights to SSK.py to compute them in memory"
    )


def _compute_features(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Features of both splits from ``--checkpoint_weights`` via ``extract_features.compute_split_features``."""
    import extract_features  # lazy: pulls in the model stack, needed only here

    defaults = vars(extract_features.get_args_parser(add_help=False).parse_args([]))
    merged = argparse.Namespace(**(defaults | {k: v for k, v in vars(args).items() if k in defaults}))
    if hasattr(args, "explicit_flags"):
        merged.explicit_flags = args.explicit_flags
    logger.info("computing features in memory with %s", args.checkpoint_weights)
    return extract_features.compute_split_features(merged, device)


def features_dir(args: argparse.Namespace) -> Path:
    """The features folder ``<save_dir>/<experiment_idx>`` (``--experiment`` when ``--experiment_idx`` is empty)."""
    folder = args.experiment_idx or args.experiment
    if not folder:
        raise SSKInputError("give --experiment_idx (the folder under --save_dir holding the features)")
    return Path(args.save_dir) / folder


def output_dir(args: argparse.Namespace) -> Path:
    """This run's output folder: ``<save_dir>/<experiment_idx>/ssk/<experiment or "default">/``.

    Without ``--experiment_idx``, ``--experiment`` names the features folder and the run is ``default``.
    """
    run = (args.experiment if args.experiment_idx else "") or DEFAULT_RUN
    try:
        return ssk_run_dir(features_dir(args), run)
    except ReportInputError as err:
        raise SSKInputError(f"--experiment {args.experiment!r}: {err}") from err


def features_fingerprint(features: torch.Tensor, labelled_mask: torch.Tensor, source: str) -> dict:
    """What identifies the training input of a fit: source, shape, the sha256 of the float32 features and of the
    labelled mask (which points are pinned to their class).

    Args:
        features: (N, D) features.
        labelled_mask: (N,) bool, True = labelled.
        source: where they came from (a file path or a description).

    Returns:
        ``{"path": source, "rows": N, "dim": D, "sha256": hex digest, "labelled_sha256": hex digest}``.
    """
    data = features.detach().to("cpu", torch.float32).contiguous().numpy()
    rows, dim = data.shape
    return {
        "path": source,
        "rows": rows,
        "dim": dim,
        "sha256": hashlib.sha256(data).hexdigest(),
        "labelled_sha256": labelled_digest(labelled_mask.cpu()),
    }


def _describe(fingerprint: dict) -> str:
    return f"{fingerprint['path']} ({fingerprint['rows']} x {fingerprint['dim']}, sha256 {fingerprint['sha256']})"


def _checked_centres(centres: object, k: int, dim: int, path: Path) -> torch.Tensor:
    if not isinstance(centres, torch.Tensor) or centres.shape != (k, dim) or not centres.is_floating_point():
        shape = tuple(centres.shape) if isinstance(centres, torch.Tensor) else type(centres).__name__
        raise SSKInputError(f"{path} must hold ({k}, {dim}) float centres for --K {k}, found {shape}")
    if not bool(torch.isfinite(centres).all()):
        raise SSKInputError(f"{path}: the centres have NaN or infinite values")
    return centres.float()


def load_centres(path: Path, fingerprint: dict, k: int, protocol: Protocol) -> torch.Tensor:
    """The centres in ``path`` after checking that they were fitted on the features ``fingerprint`` describes.

    Args:
        path: a centres file written by ``--ssk_mode train`` (a dict), or a bare (K, D) tensor.
        fingerprint: :func:`features_fingerprint` of the training features being clustered.
        k: the number of clusters of this run.
        protocol: this run's protocol; the centres must have been fitted with the same one.

    Returns:
        The (K, D) float32 centres.
    """
    if not path.is_file():
        raise MissingInputError(f"--ssk_mode test needs {path}; run SSK.py with --ssk_mode train first")
    payload = _torch_load(path, "centres file")
    if isinstance(payload, torch.Tensor):
        centres = _checked_centres(payload, k, fingerprint["dim"], path)
        logger.warning(
            "%s is a bare tensor (old format): its origin cannot be checked against %s",
            path,
            _describe(fingerprint),
        )
        return centres
    if not isinstance(payload, dict) or any(key not in payload for key in CENTRES_KEYS):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise SSKInputError(
            f"{path} holds {found}; expected a dict with {', '.join(CENTRES_KEYS)} (written by --ssk_mode train) "
            "or a bare (K, D) tensor"
        )
    fitted = payload["features"]
    if not isinstance(fitted, dict) or any(key not in fitted for key in fingerprint):
        raise SSKInputError(f"{path}: 'features' must be a dict with {', '.join(fingerprint)}")
    if any(fitted[key] != fingerprint[key] for key in ("rows", "dim", "sha256")):
        raise SSKInputError(
            f"{path} was fitted on other features: {_describe(fitted)}, not the features being clustered, "
            f"{_describe(fingerprint)}; run --ssk_mode train on these features first"
        )
    if fitted["labelled_sha256"] != fingerprint["labelled_sha256"]:
        raise SSKInputError(
            f"{path} was fitted with another labelled subset on these features (labelled-mask sha256 "
            f"{fitted['labelled_sha256']}, these features' {fingerprint['labelled_sha256']}); "
            "run --ssk_mode train first"
        )
    if payload["protocol"] != protocol.value:
        raise SSKInputError(
            f"{path} was fitted with --ssk-protocol {payload['protocol']}, this run uses {protocol.value}"
        )
    if fitted["path"] != fingerprint["path"]:
        logger.info("%s was fitted on identical features at %s", path, fitted["path"])
    return _checked_centres(payload["centres"], k, fingerprint["dim"], path)


def load_features(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, dict], dict[str, str]]:
    """Both splits from ``<save_dir>/<experiment_idx>/`` (computed in memory when missing and a checkpoint is given).

    Returns:
        ``({"train": payload, "test": payload}, {"train": source, "test": source})``.
    """
    folder = features_dir(args)
    paths = {split: folder / f"features_{split}.pt" for split in SPLITS}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing and args.checkpoint_weights:
        splits = _compute_features(args, device)
        sources = {split: f"features computed from {args.checkpoint_weights} ({split})" for split in SPLITS}
    elif missing:
        raise MissingInputError(
            f"features file {missing[0]} not found; {_extraction_hint(args, os.path.relpath(folder, args.save_dir))}"
        )
    else:
        splits = {split: _load_split(path) for split, path in paths.items()}
        sources = {split: str(path) for split, path in paths.items()}
    splits = {split: validate_split(splits[split], sources[split]) for split in SPLITS}
    train_dim, test_dim = splits["train"]["features"].shape[1], splits["test"]["features"].shape[1]
    if train_dim != test_dim:
        raise SSKInputError(
            f"feature widths differ: {sources['train']} has D={train_dim}, {sources['test']} D={test_dim}"
        )
    _check_data_flags(args, splits["train"]["meta"], sources["train"])
    return splits, sources


def _check_data_flags(args: argparse.Namespace, meta: dict, source: str) -> None:
    """Data flags given to SSK must agree with the settings the features were extracted under (``--data-path`` is
    not compared: SSK reads no image from features files)."""
    stored = meta.get("data_config")
    if stored is None:
        dataset = meta.get("dataset")
        if dataset is not None and args.dataset and str(dataset).lower() != str(args.dataset).lower():
            logger.warning(
                "--dataset %s differs from the features' dataset %s; using the features", args.dataset, dataset
            )
        return
    explicit = set(getattr(args, "explicit_flags", None) or ())
    apply_data_config(args, {k: v for k, v in stored.items() if k != "data_path"}, explicit, source)


def _gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's contiguous block, in rank order (the original row order), on CPU."""
    return torch.cat(all_gather_variable(local.to(device))).cpu()


def cluster_train(
    args: argparse.Namespace, train: dict, k: int, init_centres: torch.Tensor | None, device: torch.device
) -> tuple[KMeansResult, torch.Tensor]:
    """Run (SS-)k-means on this rank's block of the training features.

    Returns:
        The k-means result and the cluster of every training row (all ranks gathered).
    """
    rows = contiguous_shard(train["features"].shape[0])
    common = dict(
        n_init=args.k_means_init,
        max_iter=args.max_kmeans_iter,
        tol=args.tol,
        seed=args.seed,
        init_centres=init_centres,
        init=args.kmeans_init,
        device=device,
    )
    if args.ssk_protocol == Protocol.GCD.value:
        result = semi_supervised_kmeans(
            train["features"][rows], k, train["labels"][rows], train["labelled_mask"][rows], **common
        )
    else:
        result = kmeans(train["features"][rows], k, **common)
    return result, _gather_rows(result.labels, device)


def k_search_bounds(args: argparse.Namespace, num_labelled_classes: int, true_k: int, num_rows: int) -> tuple[int, int]:
    """The [min, max] candidate range of ``--K auto`` from ``--min-classes`` / ``--max-classes`` and their defaults.

    Args:
        args: the SSK arguments.
        num_labelled_classes: M, the number of classes among the labelled training images.
        true_k: the number of identities stored in the features (sets the default upper bound, 2 x true_k).
        num_rows: the number of training images (K cannot exceed it).

    Returns:
        ``(min_k, max_k)``, inclusive.
    """
    if num_labelled_classes == 0:
        raise SSKInputError(f"--K {AUTO_K} scores candidates on the labelled training images, and there are none")
    min_k = num_labelled_classes if args.min_classes is None else args.min_classes
    if min_k < num_labelled_classes:
        raise SSKInputError(
            f"--min-classes {min_k} is below the number of labelled classes M={num_labelled_classes}: with fewer "
            "clusters than labelled classes the labelled accuracy cannot peak; need --min-classes >= M"
        )
    if args.max_classes is None:
        max_k = min(2 * true_k, num_rows)
    else:
        max_k = args.max_classes
        if max_k > num_rows:
            raise SSKInputError(f"--max-classes {max_k} exceeds the number of training images ({num_rows})")
    if max_k <= min_k:
        source = "--max-classes" if args.max_classes is not None else f"the default 2 x {true_k} identities"
        raise SSKInputError(
            f"the K search range is empty: {source} gives {max_k}, which must exceed the smallest candidate "
            f"{min_k} (--min-classes, default M={num_labelled_classes})"
        )
    return min_k, max_k


def _check_k_flags(args: argparse.Namespace) -> None:
    """Flags that only make sense with ``--K auto`` are refused without it, and ``--K auto`` needs a fit."""
    if args.K != AUTO_K:
        given = [
            flag
            for flag, value in (("--min-classes", args.min_classes), ("--max-classes", args.max_classes))
            if value is not None
        ]
        if given:
            raise SSKInputError(
                f"{' and '.join(given)}: used only by --K {AUTO_K} (bounds of its search); give --K {AUTO_K} or drop "
                f"{'them' if len(given) > 1 else 'it'}"
            )
        return
    if args.ssk_mode == "test":
        raise SSKInputError(
            f"--K {AUTO_K} estimates K before a fit; --ssk_mode test starts from saved centres, whose K is fixed: "
            "pass their --K"
        )
    if args.k_estimation_init < 1:
        raise SSKInputError(f"--k-estimation-init {args.k_estimation_init}: need at least one restart per candidate")


def _estimate_k(
    args: argparse.Namespace, train: dict, num_labelled_classes: int, device: torch.device
) -> tuple[KEstimate, dict]:
    """Run the ``--K auto`` search on this rank's block of the training features.

    Returns:
        The estimate and its ``ssk_results.json`` entry (the estimate, the true K, restarts and seed).
    """
    true_k = int(train["meta"]["num_classes"])
    min_k, max_k = k_search_bounds(args, num_labelled_classes, true_k, train["features"].shape[0])
    logger.info(
        "estimating K: %s search over [%d, %d], %d restart(s) per candidate",
        args.k_search,
        min_k,
        max_k,
        args.k_estimation_init,
    )
    rows = contiguous_shard(train["features"].shape[0])
    estimate = estimate_k(
        train["features"][rows],
        train["labels"][rows],
        train["labelled_mask"][rows],
        max_k,
        min_k,
        search=args.k_search,
        n_init=args.k_estimation_init,
        max_iter=args.max_kmeans_iter,
        tol=args.tol,
        seed=args.seed,
        init=args.kmeans_init,
        device=device,
    )
    logger.info("estimated K=%d (true K=%d)", estimate.k, true_k)
    entry = {**estimate.to_dict(), "true_K": true_k, "n_init": args.k_estimation_init, "seed": args.seed}
    return estimate, entry


def _format_acc(value: float | None) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


def report(results: dict, protocol: Protocol) -> str:
    """Result table, reference-style lines ("SS-K-Means Train ACC Unlabelled_v2: All a | Old o | New n") and one
    face-clustering line per set ("SS-K-Means Test clustering: pairwise F f | BCubed F b | NMI m | ARI r")."""
    prefix = "SS-K-Means" if protocol is Protocol.GCD else "K-Means"
    train_name = "Train ACC Unlabelled" if protocol is Protocol.GCD else "Train ACC All"
    train_set = "Train Unlabelled" if protocol is Protocol.GCD else "Train All"
    labels = {key: f"{key} ({results[key]['set']}, n={results[key]['num_samples']})" for key in ("train", "test")}
    width = max(len("set"), *map(len, labels.values())) + 2
    lines = [f"{'set':<{width}}{'metric':<8}{'All':>8}{'Old':>8}{'New':>8}"]
    reference_lines = []
    clustering_lines = []
    for key, name, set_name in (("train", train_name, train_set), ("test", "Test ACC", "Test")):
        block = results[key]
        for variant in EVAL_FUNCS:
            acc = block[variant.value]
            lines.append(
                f"{labels[key]:<{width}}{variant.value:<8}"
                + "".join(f"{_format_acc(acc[s]):>8}" for s in ("all", "old", "new"))
            )
            reference_lines.append(
                f"{prefix} {name}_{variant.value}: All {_format_acc(acc['all'])} | "
                f"Old {_format_acc(acc['old'])} | New {_format_acc(acc['new'])}"
            )
        scores = block[CLUSTERING_KEY]
        clustering_lines.append(
            f"{prefix} {set_name} clustering: pairwise F {scores['pairwise_f']:.4f} | "
            f"BCubed F {scores['bcubed_f']:.4f} | NMI {scores['nmi']:.4f} | ARI {scores['ari']:.4f}"
        )
    if K_ESTIMATION_KEY in results:
        est = results[K_ESTIMATION_KEY]
        accuracy = {point["K"]: point["labelled_acc"] for point in est["evaluated"]}
        clustering_lines.append(
            f"K estimation ({est['search']} over [{est['min_K']}, {est['max_K']}], {len(accuracy)} candidates): "
            f"K = {est['K']} (labelled accuracy {accuracy[est['K']]:.4f}) | true K = {est['true_K']}"
        )
    return "\n".join(lines + [""] + reference_lines + clustering_lines)


def _score(labels: torch.Tensor, pred: torch.Tensor, known: torch.Tensor, name: str) -> dict:
    """Accuracy variants and face-clustering scores (under ``CLUSTERING_KEY``) of one evaluated set."""
    scores = evaluate_clustering(labels, pred, known, EVAL_FUNCS)
    return {
        "set": name,
        "num_samples": int(labels.numel()),
        **scores,
        CLUSTERING_KEY: clustering_scores(labels, pred),
    }


def _plain(value):
    """JSON-friendly copy of argument values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def run(args: argparse.Namespace, device: torch.device) -> dict:
    """Load, cluster, score and (rank 0) write; returns the results dict."""
    start = time.perf_counter()
    protocol = Protocol(args.ssk_protocol)
    _check_k_flags(args)
    out_dir = output_dir(args)
    logger.info("SSK run folder: %s", out_dir)
    splits, sources = load_features(args, device)
    train, test = splits["train"], splits["test"]
    meta = train["meta"]
    num_labelled_classes = int(torch.unique(train["labels"][train["labelled_mask"]]).numel())
    estimate = k_estimation = None
    if args.K == AUTO_K:
        estimate, k_estimation = _estimate_k(args, train, num_labelled_classes, device)
        k = estimate.k
    else:
        k = args.K if args.K is not None else int(meta["num_classes"])
    if k < 1:
        raise SSKInputError(f"--K {k}: need at least one cluster")
    if protocol is Protocol.GCD and k < num_labelled_classes:
        raise SSKInputError(
            f"--K {k} is smaller than the number of labelled classes M={num_labelled_classes} in "
            f"{sources['train']}; need K >= M"
        )
    if k > train["features"].shape[0]:
        raise SSKInputError(f"--K {k} exceeds the number of training images ({train['features'].shape[0]})")
    fingerprint = features_fingerprint(train["features"], train["labelled_mask"], sources["train"])
    init_centres = None
    if args.ssk_mode == "test":
        init_centres = load_centres(out_dir / CENTRES_FILE, fingerprint, k, protocol)
        logger.info("starting from the centres in %s", out_dir / CENTRES_FILE)
    logger.info(
        "%s protocol: K=%d, M=%d, %d train / %d test images, world size %d",
        protocol.value,
        k,
        num_labelled_classes,
        train["features"].shape[0],
        test["features"].shape[0],
        get_world_size(),
    )

    result, train_pred = cluster_train(args, train, k, init_centres, device)
    test_rows = contiguous_shard(test["features"].shape[0])
    test_pred = _gather_rows(assign_to_centres(test["features"][test_rows], result.centres, device=device), device)
    if not is_primary():
        return {}

    scored = ~train["labelled_mask"] if protocol is Protocol.GCD else torch.ones_like(train["labelled_mask"])
    results = {
        "protocol": protocol.value,
        "mode": args.ssk_mode,
        "dataset": meta.get("dataset"),
        "K": k,
        "M": num_labelled_classes,
        "n_init": args.k_means_init,
        "init": args.kmeans_init,
        "max_iter": args.max_kmeans_iter,
        "tol": args.tol,
        "seed": args.seed,
        "world_size": get_world_size(),
        "device": str(device),
        "inertia": result.inertia,
        "iterations": result.n_iter,
        "best_restart": result.best_restart,
        "restart_inertia": result.restart_inertia,
        "train": _score(
            train["labels"][scored],
            train_pred[scored],
            train["known_mask"][scored],
            "unlabelled" if protocol is Protocol.GCD else "all",
        ),
        "test": _score(test["labels"], test_pred, test["known_mask"], "test"),
        **({K_ESTIMATION_KEY: k_estimation} if k_estimation is not None else {}),
        "features": sources,
        "train_features_sha256": fingerprint["sha256"],
        "output_dir": str(out_dir),
        "args": {k_: _plain(v) for k_, v in vars(args).items()},
        "seconds": time.perf_counter() - start,
    }
    print(report(results, protocol), flush=True)
    predictions = {
        "uq_idx": torch.cat([train["uq_idx"], test["uq_idx"]]).long(),
        "split": torch.cat(
            [torch.zeros(len(train_pred), dtype=torch.long), torch.ones(len(test_pred), dtype=torch.long)]
        ),
        "split_names": list(SPLITS),
        "label": torch.cat([train["labels"], test["labels"]]).long(),
        "cluster": torch.cat([train_pred, test_pred]),
        "labelled": torch.cat([train["labelled_mask"], test["labelled_mask"]]),
    }
    centres = {
        "centres": result.centres.cpu(),
        "K": k,
        "D": fingerprint["dim"],
        "protocol": protocol.value,
        "features": fingerprint,
    }
    atomic_save(centres, out_dir / CENTRES_FILE)
    atomic_save(predictions, out_dir / PREDICTIONS_FILE)
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2))
    if not args.no_plots:
        from utils.plots import plot_tsne  # lazy: sklearn's t-SNE and matplotlib

        plot_tsne(test["features"], test["known_mask"], out_dir / TSNE_FILE, seed=args.seed)
        if k_estimation is not None:
            plot_k_estimation(estimate, out_dir / K_ESTIMATION_FILE, true_k=k_estimation["true_K"])
    logger.info("wrote %s, %s, %s to %s", RESULTS_FILE, PREDICTIONS_FILE, CENTRES_FILE, out_dir)
    return results


def main(args: argparse.Namespace) -> int:
    """Run SSK; bad input ends with one error message and exit code 2."""
    device = init_distributed(args.device)
    setup_logging(rank=get_rank())
    log_ignored_flags(args)
    try:
        run(args, device)
    except (SSKInputError, MissingInputError, DataConfigError, DatasetError, CheckpointError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    cli_args = parse_args_with_config(get_args_parser())
    cli_args.explicit_flags = sorted(explicit_dests(get_args_parser(), sys.argv[1:]))
    sys.exit(main(cli_args))
