"""The library behind SSK.py (the command line lives there): its inputs, the centres of a fit, ``--K auto``, the report.

- **Features.** ``load_split`` reads one ``features_{train,test}.pt``; ``validate_split`` and ``validate_splits``
  check keys, dtypes, lengths, finite values, the metadata and that both splits have the same width.
- **Centres.** ``features_fingerprint`` identifies the training input of a fit (path, shape, sha256 of the float32
  features and of the labelled mask). ``save_centres`` writes it with the centres; ``load_centres`` refuses centres
  fitted on other features, another labelled subset or another protocol, and accepts a bare (K, D) tensor (the
  reference's format) with a warning.
- **K estimation.** ``k_search_bounds`` resolves the candidate range of ``--K auto`` and ``estimate_train_k`` runs
  ``utils.k_estimation.estimate_k`` on this rank's block of the training features.
- **Report.** ``score_set`` scores one evaluated set (accuracy variants and face-clustering scores) and
  ``format_report`` renders a run's results as SSK.py prints them.

Errors about the input are ``SSKInputError`` (``MissingInputError`` for a missing file); their messages name SSK.py's
flags. See docs/method.md, sections 1 and 10-12.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from enum import Enum
from pathlib import Path

import torch

from utils.checkpoint import atomic_save
from utils.output_sets import OUTPUT_ID_KEY, check_output_ids
from utils.report import EXTRACTION_MANIFEST
from utils.distributed import contiguous_shard
from utils.evaluation.clustering import MetricVariant, clustering_scores, evaluate_clustering
from utils.k_estimation import KEstimate, estimate_k

logger = logging.getLogger("SSK")  # the messages read as SSK.py's own

SPLITS = ("train", "test")
FEATURE_KEYS = ("features", "labels", "uq_idx", "known_mask", "labelled_mask")
META_KEYS = ("num_classes", "num_known")
CENTRES_KEYS = ("centres", "K", "D", "protocol", "features")
AUTO_K = "auto"
K_ESTIMATION_KEY = "k_estimation"
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


def _torch_load(path: Path, what: str) -> object:
    """``torch.load(weights_only=True)`` on CPU; an unreadable file becomes one ``SSKInputError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise SSKInputError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err


def load_split(path: Path) -> dict:
    """Read one features file (``features_{train,test}.pt``) without checking its content.

    Args:
        path: the file written by extract_features.py.

    Returns:
        The split's dict; check it with :func:`validate_split`.
    """
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


def validate_splits(splits: dict[str, dict], sources: dict[str, str]) -> dict[str, dict]:
    """Check both splits with :func:`validate_split` and that their features have the same width.

    Args:
        splits: ``{"train": payload, "test": payload}``.
        sources: where each split came from, for error messages.

    Returns:
        The checked splits, features as float32.
    """
    splits = {split: validate_split(splits[split], sources[split]) for split in SPLITS}
    train_dim, test_dim = splits["train"]["features"].shape[1], splits["test"]["features"].shape[1]
    if train_dim != test_dim:
        raise SSKInputError(
            f"feature widths differ: {sources['train']} has D={train_dim}, {sources['test']} D={test_dim}"
        )
    return splits


def check_feature_set(folder: Path, splits: dict[str, dict]) -> None:
    """The two features files must come from one finished extraction: both carry the id of the folder's
    ``extraction.json`` (``utils.output_sets``), and files without ids (hand-made, or older) name one checkpoint.

    Raises:
        IncompleteOutputError: the files belong to different or unfinished extractions.
        SSKInputError: the train and test files were extracted from different checkpoints.
    """
    manifest = folder / EXTRACTION_MANIFEST
    manifest_id = json.loads(manifest.read_text(encoding="utf-8")).get(OUTPUT_ID_KEY) if manifest.is_file() else None
    metas = {split: splits[split].get("meta") or {} for split in SPLITS}
    rerun = "extract the features again (extract_features.py ... --overwrite)"
    check_output_ids(manifest_id, {f"features_{s}.pt": metas[s].get(OUTPUT_ID_KEY) for s in SPLITS}, folder, rerun)
    checkpoints = {split: metas[split].get("checkpoint") for split in SPLITS}
    if "checkpoint" in metas["train"] and "checkpoint" in metas["test"] and len(set(checkpoints.values())) > 1:
        raise SSKInputError(
            f"{folder}: features_train.pt was extracted from {checkpoints['train']}, features_test.pt from "
            f"{checkpoints['test']}; {rerun}"
        )


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
        "labelled_sha256": hashlib.sha256(labelled_mask.cpu().to(torch.bool).numpy().tobytes()).hexdigest(),
    }


def _describe(fingerprint: dict) -> str:
    return f"{fingerprint['path']} ({fingerprint['rows']} x {fingerprint['dim']}, sha256 {fingerprint['sha256']})"


def _checked_centres(centres: object, k: int, dim: int, path: Path) -> torch.Tensor:
    """``centres`` as float32 if it is a finite (k, dim) float tensor; otherwise an ``SSKInputError``."""
    if not isinstance(centres, torch.Tensor) or centres.shape != (k, dim) or not centres.is_floating_point():
        shape = tuple(centres.shape) if isinstance(centres, torch.Tensor) else type(centres).__name__
        raise SSKInputError(f"{path} must hold ({k}, {dim}) float centres for --K {k}, found {shape}")
    if not bool(torch.isfinite(centres).all()):
        raise SSKInputError(f"{path}: the centres have NaN or infinite values")
    return centres.float()


def save_centres(
    path: Path, centres: torch.Tensor, fingerprint: dict, protocol: Protocol, output_id: str | None = None
) -> Path:
    """Write the centres of a fit with what they were fitted on, as :func:`load_centres` reads them.

    Args:
        path: the centres file (written atomically).
        centres: (K, D) fitted centres.
        fingerprint: :func:`features_fingerprint` of the training features of the fit.
        protocol: the protocol of the fit.
        output_id: the id of the run's output set, which its ``ssk_results.json`` repeats once the run has finished.

    Returns:
        The written path.
    """
    payload = {
        "centres": centres.cpu(),
        "K": int(centres.shape[0]),
        "D": fingerprint["dim"],
        "protocol": protocol.value,
        "features": fingerprint,
        OUTPUT_ID_KEY: output_id,
    }
    return atomic_save(payload, path)


def load_centres(path: Path, fingerprint: dict, k: int, protocol: Protocol) -> torch.Tensor:
    """The centres in ``path`` after checking that they were fitted on the features ``fingerprint`` describes.

    Args:
        path: a centres file written by ``--ssk-mode train`` (a dict), or a bare (K, D) tensor.
        fingerprint: :func:`features_fingerprint` of the training features being clustered.
        k: the number of clusters of this run.
        protocol: this run's protocol; the centres must have been fitted with the same one.

    Returns:
        The (K, D) float32 centres.
    """
    if not path.is_file():
        raise MissingInputError(f"--ssk-mode test needs {path}; run SSK.py with --ssk-mode train first")
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
            f"{path} holds {found}; expected a dict with {', '.join(CENTRES_KEYS)} (written by --ssk-mode train) "
            "or a bare (K, D) tensor"
        )
    fitted = payload["features"]
    if not isinstance(fitted, dict) or any(key not in fitted for key in fingerprint):
        raise SSKInputError(f"{path}: 'features' must be a dict with {', '.join(fingerprint)}")
    if any(fitted[key] != fingerprint[key] for key in ("rows", "dim", "sha256")):
        raise SSKInputError(
            f"{path} was fitted on other features: {_describe(fitted)}, not the features being clustered, "
            f"{_describe(fingerprint)}; run --ssk-mode train on these features first"
        )
    if fitted["labelled_sha256"] != fingerprint["labelled_sha256"]:
        raise SSKInputError(
            f"{path} was fitted with another labelled subset on these features (labelled-mask sha256 "
            f"{fitted['labelled_sha256']}, these features' {fingerprint['labelled_sha256']}); "
            "run --ssk-mode train first"
        )
    if payload["protocol"] != protocol.value:
        raise SSKInputError(
            f"{path} was fitted with --ssk-protocol {payload['protocol']}, this run uses {protocol.value}"
        )
    if fitted["path"] != fingerprint["path"]:
        logger.info("%s was fitted on identical features at %s", path, fitted["path"])
    return _checked_centres(payload["centres"], k, fingerprint["dim"], path)


def k_search_bounds(
    num_labelled_classes: int,
    true_k: int,
    num_rows: int,
    min_classes: int | None = None,
    max_classes: int | None = None,
) -> tuple[int, int]:
    """The [min, max] candidate range of ``--K auto`` from ``--min-classes`` / ``--max-classes`` and their defaults.

    Args:
        num_labelled_classes: M, the number of classes among the labelled training images.
        true_k: the number of identities stored in the features (sets the default upper bound, 2 x true_k).
        num_rows: the number of training images (K cannot exceed it).
        min_classes: ``--min-classes`` (default: M).
        max_classes: ``--max-classes`` (default: 2 x true_k, at most ``num_rows``).

    Returns:
        ``(min_k, max_k)``, inclusive.
    """
    if num_labelled_classes == 0:
        raise SSKInputError(f"--K {AUTO_K} scores candidates on the labelled training images, and there are none")
    min_k = num_labelled_classes if min_classes is None else min_classes
    if min_k < num_labelled_classes:
        raise SSKInputError(
            f"--min-classes {min_k} is below the number of labelled classes M={num_labelled_classes}: with fewer "
            "clusters than labelled classes the labelled accuracy cannot peak; need --min-classes >= M"
        )
    if max_classes is None:
        max_k = min(2 * true_k, num_rows)
    else:
        max_k = max_classes
        if max_k > num_rows:
            raise SSKInputError(f"--max-classes {max_k} exceeds the number of training images ({num_rows})")
    if max_k <= min_k:
        source = "--max-classes" if max_classes is not None else f"the default 2 x {true_k} identities"
        raise SSKInputError(
            f"the K search range is empty: {source} gives {max_k}, which must exceed the smallest candidate "
            f"{min_k} (--min-classes, default M={num_labelled_classes})"
        )
    return min_k, max_k


def estimate_train_k(
    train: dict,
    num_labelled_classes: int,
    *,
    min_classes: int | None,
    max_classes: int | None,
    search: str,
    n_init: int,
    max_iter: int,
    tol: float,
    seed: int,
    init: str,
    device: torch.device,
) -> tuple[KEstimate, dict]:
    """Run the ``--K auto`` search on this rank's block of the training features (collective under torchrun).

    Args:
        train: the validated training split (all rows; this rank takes its contiguous block).
        num_labelled_classes: M, the number of classes among the labelled training images.
        min_classes: ``--min-classes``, see :func:`k_search_bounds`.
        max_classes: ``--max-classes``, see :func:`k_search_bounds`.
        search: ``"brent"`` or ``"binary"``.
        n_init: k-means restarts per candidate K.
        max_iter: Lloyd iteration cap per restart.
        tol: k-means stopping tolerance.
        seed: base seed, the same for every candidate.
        init: seeding of each restart, ``"k-means++"`` or ``"k-means||"``.
        device: compute device of k-means.

    Returns:
        The estimate and its ``ssk_results.json`` entry (the estimate, the true K, restarts and seed).
    """
    true_k = int(train["meta"]["num_classes"])
    num_rows = train["features"].shape[0]
    min_k, max_k = k_search_bounds(num_labelled_classes, true_k, num_rows, min_classes, max_classes)
    logger.info("estimating K: %s search over [%d, %d], %d restart(s) per candidate", search, min_k, max_k, n_init)
    rows = contiguous_shard(num_rows)
    estimate = estimate_k(
        train["features"][rows],
        train["labels"][rows],
        train["labelled_mask"][rows],
        max_k,
        min_k,
        search=search,
        n_init=n_init,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        init=init,
        device=device,
    )
    logger.info("estimated K=%d (true K=%d)", estimate.k, true_k)
    entry = {**estimate.to_dict(), "true_K": true_k, "n_init": n_init, "seed": seed}
    return estimate, entry


def score_set(labels: torch.Tensor, pred: torch.Tensor, known: torch.Tensor, name: str) -> dict:
    """Accuracy variants and face-clustering scores of one evaluated set, as ``ssk_results.json`` holds them.

    Args:
        labels: (n,) class labels.
        pred: (n,) cluster indices.
        known: (n,) bool, True for images of known (old) classes.
        name: the set's name (``"unlabelled"``, ``"all"`` or ``"test"``).

    Returns:
        ``{"set", "num_samples", <variant>: {"all", "old", "new"} for each of EVAL_FUNCS, CLUSTERING_KEY: scores}``.
    """
    scores = evaluate_clustering(labels, pred, known, EVAL_FUNCS)
    return {
        "set": name,
        "num_samples": int(labels.numel()),
        **scores,
        CLUSTERING_KEY: clustering_scores(labels, pred),
    }


def _format_acc(value: float | None) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


def format_report(results: dict, protocol: Protocol) -> str:
    """Result table, reference-style lines ("SS-K-Means Train ACC Unlabelled_v2: All a | Old o | New n") and one
    face-clustering line per set ("SS-K-Means Test clustering: pairwise F f | BCubed F b | NMI m | ARI r").

    Args:
        results: a run's results, with ``"train"`` and ``"test"`` scored by :func:`score_set` and, after ``--K auto``,
            the estimate under ``K_ESTIMATION_KEY``.
        protocol: the run's protocol (names the sets and the method).

    Returns:
        The text SSK.py prints.
    """
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
