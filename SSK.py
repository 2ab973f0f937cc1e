#!/usr/bin/env python3
"""Semi-supervised k-means on extracted features: step 3 of train -> extract -> SSK (docs/method.md, sections 1, 11-12).

Reads ``<save_dir>/<experiment_idx>/features_{train,test}.pt`` (or computes them in memory with
``--checkpoint-weights``), clusters the training features and writes, next to the features it used,
``<save_dir>/<experiment_idx>/ssk/<experiment>/``: ``ssk_results.json``, ``ssk_predictions.pt``,
``ss_kmeans_cluster_centres.pt``, ``tsne_test.png`` and, with ``--K auto``, ``k_estimation.png``. ``--experiment``
names the SSK run within that features folder (``default`` when not given; without ``--experiment-idx`` it names the
features folder and the run is ``default``), so runs on different features never overwrite each other, whatever their
``--experiment``.

The centres file is a dict: the (K, D) ``centres``, ``K``, ``D``, the ``protocol`` and a fingerprint of the training
features they were fitted on (path, rows, sha256 of the float32 bytes). ``--ssk-mode test`` starts from the centres
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

    python SSK.py --save-dir results --experiment-idx run --K 100              # -> results/run/ssk/default/
    python SSK.py --save-dir results --experiment-idx run --K auto --experiment auto  # K estimated first
    torchrun --nproc_per_node=2 SSK.py --save-dir results --experiment-idx run --experiment k100

Under torchrun every rank clusters a contiguous block of the rows; the result equals the single-process run up to
float summation order.

Flags: the hyphenated spelling is the canonical one; the underscore spellings of the reference's commands
(``--save_dir``, ``--experiment_idx``, ``--k_means_init``, ...) stay accepted. This file is the command line; the
feature and centre files, ``--K auto`` and the report are ``utils.ssk``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from trainer.args import (
    add_checkpoint_data_args,
    add_compat_args,
    add_data_args,
    add_runtime_args,
    parse_recording_explicit,
    log_ignored_flags,
    positive_int,
)
from trainer.cli import add_checkpoint_model_args
from trainer.data import apply_data_config
from utils.checkpoint import atomic_save, atomic_write_text
from utils.config import hide_alias_spellings
from utils.distributed import (
    all_gather_variable,
    cleanup,
    contiguous_shard,
    get_rank,
    get_world_size,
    init_distributed,
    is_primary,
)
from utils.k_estimation import SEARCHES, plot_k_estimation
from utils.kmeans import INITS, KMeansResult, assign_to_centres, kmeans, semi_supervised_kmeans
from utils.logging import setup_logging
from utils.report import DEFAULT_RUN, RESULTS_FILE, SSK_SUBDIR, ReportInputError, ssk_run_dir
from utils.cli_errors import exit_code
from utils.output_sets import (
    OUTPUT_ID_KEY,
    check_output_ids,
    new_output_id,
    refuse_complete_output,
    withdraw_manifest,
)
from utils.run_lock import RunLock
from utils.ssk import (
    AUTO_K,
    K_ESTIMATION_KEY,
    check_feature_set,
    SPLITS,
    MissingInputError,
    Protocol,
    SSKInputError,
    estimate_train_k,
    features_fingerprint,
    format_report,
    load_centres,
    load_split,
    save_centres,
    score_set,
    validate_splits,
)

logger = logging.getLogger("SSK")

CENTRES_FILE = "ss_kmeans_cluster_centres.pt"
PREDICTIONS_FILE = "ssk_predictions.pt"
TSNE_FILE = "tsne_test.png"
K_ESTIMATION_FILE = "k_estimation.png"
K_ESTIMATION_INIT = 1  # restarts per candidate K: one keeps the search cheap (GCD's sklearn KMeans used 10)


def int_or_auto(value: str) -> int | str:
    """``--K``: a positive integer or ``auto``."""
    if value.strip().lower() == AUTO_K:
        return AUTO_K
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{AUTO_K}', got {value!r}") from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The SSK parser; the dataset and model groups matter only when features are computed in memory."""
    parser = argparse.ArgumentParser(
        prog="SSK.py",
        description="Semi-supervised k-means on extracted features (or features computed from --checkpoint-weights), "
        "scored with the GCD metrics and the face-clustering F-scores.",
        add_help=add_help,
        allow_abbrev=False,
        epilog=(
            f"Outputs go to <save_dir>/<experiment_idx>/{SSK_SUBDIR}/<experiment>/ ({RESULTS_FILE}, "
            f"{PREDICTIONS_FILE}, {CENTRES_FILE}, {TSNE_FILE}, with --K auto {K_ESTIMATION_FILE}): --experiment names "
            f"the SSK run on those features ('{DEFAULT_RUN}' when not given). Dataset and model flags are used only "
            "with --checkpoint-weights (features computed in memory)."
        ),
    )
    add_data_args(parser)
    add_checkpoint_data_args(parser)
    add_checkpoint_model_args(parser)
    add_runtime_args(parser)
    group = parser.add_argument_group("Features")
    group.add_argument(
        "--save-dir",
        "--save_dir",
        dest="save_dir",
        default="results",
        help=f"root of the features folders; SSK results go inside them, under {SSK_SUBDIR}/ (default: results)",
    )
    group.add_argument(
        "--experiment-idx",
        "--experiment_idx",
        dest="experiment_idx",
        default="",
        help=(
            "folder under --save-dir holding features_{train,test}.pt; the run's outputs go to its "
            f"{SSK_SUBDIR}/<experiment>/ (default: --experiment, the run then being '{DEFAULT_RUN}')"
        ),
    )
    group.add_argument(
        "--checkpoint-weights",
        "--checkpoint_weights",
        dest="checkpoint_weights",
        default=None,
        help="compute missing features in memory with this checkpoint, as extract_features.py does (default: none: "
        "missing features are an error)",
    )
    group.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load --checkpoint-weights and --pretrained-weights with weights_only=False (only for files you trust)",
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
        "--max-kmeans-iter",
        "--max_kmeans_iter",
        dest="max_kmeans_iter",
        type=positive_int,
        default=500,
        help="Lloyd iteration cap per restart (default: 500)",
    )
    group.add_argument(
        "--kmeans-restarts",
        "--k_means_init",
        "--k-means-init",
        dest="k_means_init",
        type=positive_int,
        default=10,
        metavar="N",
        help="k-means restarts, each seeded by --kmeans-seeding; the lowest inertia wins (default: 10)",
    )
    group.add_argument(
        "--kmeans-seeding",
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
        "--ssk-mode",
        "--ssk_mode",
        dest="ssk_mode",
        default="train",
        choices=("train", "test"),
        help=(
            f"test: start one Lloyd run from the run folder's {CENTRES_FILE}, which must have been fitted on the "
            "same training features with the same protocol (default: train)"
        ),
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="with --ssk-mode train, replace the complete results of an earlier run in the run folder (default: off; "
        "--ssk-mode test always rewrites the results and predictions of the centres it starts from)",
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
        "images only (GCD's estimator); --max-kmeans-iter, --tol, --kmeans-seeding and --seed apply to each candidate",
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
        type=positive_int,
        default=K_ESTIMATION_INIT,
        help=f"k-means restarts per candidate K, seeded by --kmeans-seeding from --seed (default: {K_ESTIMATION_INIT})",
    )
    add_compat_args(parser)
    return hide_alias_spellings(parser)


def _extraction_hint(args: argparse.Namespace, folder: str) -> str:
    """How to get the features of ``<save_dir>/<folder>``: the extraction command, or ``--checkpoint-weights``."""
    return (
        f"extract them first: torchrun --nproc_per_node=<GPUs> extract_features.py --dataset {args.dataset} "
        f"--data-path <DATA> --checkpoint-weights <model_best.pth.tar> --save-dir {args.save_dir} "
        f"--experiment {folder}, or pass --checkpoint-weights to SSK.py to compute them in memory"
    )


def _compute_features(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Features of both splits from ``--checkpoint-weights`` via ``extract_features.compute_split_features``."""
    import extract_features  # lazy: pulls in the model stack, needed only here

    defaults = vars(extract_features.get_args_parser(add_help=False).parse_args([]))
    merged = argparse.Namespace(**(defaults | {k: v for k, v in vars(args).items() if k in defaults}))
    if hasattr(args, "explicit_flags"):
        merged.explicit_flags = args.explicit_flags
    logger.info("computing features in memory with %s", args.checkpoint_weights)
    return extract_features.compute_split_features(merged, device)


def features_dir(args: argparse.Namespace) -> Path:
    """The features folder ``<save_dir>/<experiment_idx>`` (``--experiment`` when ``--experiment-idx`` is empty)."""
    folder = args.experiment_idx or args.experiment
    if not folder:
        raise SSKInputError("give --experiment-idx (the folder under --save-dir holding the features)")
    return Path(args.save_dir) / folder


def output_dir(args: argparse.Namespace) -> Path:
    """This run's output folder: ``<save_dir>/<experiment_idx>/ssk/<experiment or "default">/``.

    Without ``--experiment-idx``, ``--experiment`` names the features folder and the run is ``default``.
    """
    run = (args.experiment if args.experiment_idx else "") or DEFAULT_RUN
    try:
        return ssk_run_dir(features_dir(args), run)
    except ReportInputError as err:
        raise SSKInputError(f"--experiment {args.experiment!r}: {err}") from err


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
        splits = {split: load_split(path) for split, path in paths.items()}
        sources = {split: str(path) for split, path in paths.items()}
        check_feature_set(folder, splits)
    splits = validate_splits(splits, sources)
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
            f"--K {AUTO_K} estimates K before a fit; --ssk-mode test starts from saved centres, whose K is fixed: "
            "pass their --K"
        )
    if args.k_estimation_init < 1:
        raise SSKInputError(f"--k-estimation-init {args.k_estimation_init}: need at least one restart per candidate")


def _plain(value):
    """JSON-friendly copy of argument values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def check_finished_fit(out_dir: Path) -> None:
    """The centres in ``out_dir`` must come from a run that finished: its ``ssk_results.json`` carries the centres'
    output id (centres written before ids existed are not checked).

    Raises:
        IncompleteOutputError: the centres belong to a run that did not finish, or to another run than the results.
    """
    payload = torch.load(out_dir / CENTRES_FILE, map_location="cpu", weights_only=True, mmap=True)
    centres_id = payload.get(OUTPUT_ID_KEY) if isinstance(payload, dict) else None
    results = out_dir / RESULTS_FILE
    stored = json.loads(results.read_text(encoding="utf-8")).get(OUTPUT_ID_KEY) if results.is_file() else None
    check_output_ids(stored, {CENTRES_FILE: centres_id}, out_dir, "run SSK.py --ssk-mode train (--overwrite) first")


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
        estimate, k_estimation = estimate_train_k(
            train,
            num_labelled_classes,
            min_classes=args.min_classes,
            max_classes=args.max_classes,
            search=args.k_search,
            n_init=args.k_estimation_init,
            max_iter=args.max_kmeans_iter,
            tol=args.tol,
            seed=args.seed,
            init=args.kmeans_init,
            device=device,
        )
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
        check_finished_fit(out_dir)
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
        "train": score_set(
            train["labels"][scored],
            train_pred[scored],
            train["known_mask"][scored],
            "unlabelled" if protocol is Protocol.GCD else "all",
        ),
        "test": score_set(test["labels"], test_pred, test["known_mask"], "test"),
        **({K_ESTIMATION_KEY: k_estimation} if k_estimation is not None else {}),
        "features": sources,
        "train_features_sha256": fingerprint["sha256"],
        "output_dir": str(out_dir),
        "args": {k_: _plain(v) for k_, v in vars(args).items()},
        "seconds": time.perf_counter() - start,
        OUTPUT_ID_KEY: new_output_id(),
    }
    print(format_report(results, protocol), flush=True)
    predictions = {
        "uq_idx": torch.cat([train["uq_idx"], test["uq_idx"]]).long(),
        "split": torch.cat(
            [torch.zeros(len(train_pred), dtype=torch.long), torch.ones(len(test_pred), dtype=torch.long)]
        ),
        "split_names": list(SPLITS),
        "label": torch.cat([train["labels"], test["labels"]]).long(),
        "cluster": torch.cat([train_pred, test_pred]),
        "labelled": torch.cat([train["labelled_mask"], test["labelled_mask"]]),
        OUTPUT_ID_KEY: results[OUTPUT_ID_KEY],
    }
    # one output set (utils.output_sets): the results are the manifest, withdrawn first and written last
    withdraw_manifest(out_dir / RESULTS_FILE)
    save_centres(out_dir / CENTRES_FILE, result.centres, fingerprint, protocol, results[OUTPUT_ID_KEY])
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
    """Run SSK in its locked run folder; bad input ends with one error message and exit code 2."""
    device = init_distributed(args.device)
    setup_logging(rank=get_rank())
    log_ignored_flags(args)

    def locked_run() -> int:
        if args.ssk_mode == "train":
            refuse_complete_output(output_dir(args) / RESULTS_FILE, args.overwrite, "SSK results")
        with RunLock(output_dir(args), "SSK run folder") if is_primary() else contextlib.nullcontext():
            run(args, device)
        return 0

    try:
        return exit_code(locked_run, logger)
    finally:
        cleanup()


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv`` (default: ``sys.argv[1:]``), remember which flags it set, run SSK."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    return exit_code(lambda: main(parse_recording_explicit(get_args_parser, argv)), logger)


if __name__ == "__main__":
    sys.exit(cli())
