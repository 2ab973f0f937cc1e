"""SSK.py end to end on synthetic feature files: outputs, protocols, test mode, bad input, torchrun."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import SSK
from utils import report
from utils.evaluation.clustering import clustering_scores
from utils.ssk import CLUSTERING_KEY, EVAL_FUNCS, K_ESTIMATION_KEY

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES, NUM_KNOWN, DIM = 8, 4, 16


def make_split(split: str, per_class: int, seed: int) -> dict:
    """Separated blobs on the unit sphere, shuffled; known = label < 4; half the known train images labelled."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    feats = torch.nn.functional.normalize(means[labels] + 0.05 * torch.randn(labels.numel(), DIM, generator=gen))
    known = labels < NUM_KNOWN
    labelled = known & (torch.rand(labels.numel(), generator=gen) < 0.5) if split == "train" else known & False
    meta = {"dataset": "synthetic", "split": split, "num_classes": NUM_CLASSES, "num_known": NUM_KNOWN}
    return {
        "features": feats,
        "labels": labels,
        "uq_idx": torch.arange(labels.numel()),
        "known_mask": known,
        "labelled_mask": labelled,
        "meta": meta,
    }


def write_features(root: Path, name: str = "feats", seed: int = 1, **overrides) -> Path:
    """Train (seed) and test (seed + 1) features in ``root/name``; ``overrides[split]`` replaces keys."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class, split_seed in (("train", 30, seed), ("test", 10, seed + 1)):
        payload = make_split(split, per_class, split_seed)
        payload.update(overrides.get(split, {}))
        torch.save(payload, folder / f"features_{split}.pt")
    return folder


def parse(*argv: str):
    return SSK.get_args_parser().parse_args(["--device", "cpu", "--kmeans-restarts", "2", *argv])


def run_dir(root: Path, features: str = "feats", run: str = "default") -> Path:
    """Where an SSK run on ``root/features`` keeps its outputs."""
    return root / features / "ssk" / run


def read_results(folder: Path) -> dict:
    return json.loads((folder / report.RESULTS_FILE).read_text())


def load_centres(folder: Path) -> dict:
    return torch.load(folder / SSK.CENTRES_FILE, weights_only=True)


def test_gcd_protocol_end_to_end(tmp_path, capsys):
    write_features(tmp_path)
    rc = SSK.main(parse("--save-dir", str(tmp_path), "--experiment-idx", "feats", "--experiment", "out"))
    assert rc == 0
    out = run_dir(tmp_path, run="out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats"]
    results = read_results(out)
    assert results["protocol"] == "gcd" and results["K"] == NUM_CLASSES and results["M"] == NUM_KNOWN
    assert results["world_size"] == 1 and results["n_init"] == 2 and results["max_iter"] == 500
    assert results["iterations"] >= 1 and results["inertia"] > 0
    train = make_split("train", 30, 1)
    assert results["train"]["set"] == "unlabelled"
    assert results["train"]["num_samples"] == int((~train["labelled_mask"]).sum())
    for variant in ("v2", "v1", "v2b"):
        assert results["train"][variant] == {"all": 1.0, "old": 1.0, "new": 1.0}
        assert results["test"][variant] == {"all": 1.0, "old": 1.0, "new": 1.0}
    printed = capsys.readouterr().out
    assert "SS-K-Means Train ACC Unlabelled_v2: All 1.0000 | Old 1.0000 | New 1.0000" in printed
    assert "SS-K-Means Test ACC_v1: All 1.0000" in printed
    table = [line for line in printed.splitlines() if line.startswith(("set ", "train (", "test ("))]
    assert len(table) == 1 + 2 * len(EVAL_FUNCS)
    assert len({line.index(" 1.0000") for line in table[1:]}) == 1  # the All column lines up under its header
    assert len({len(line) for line in table}) == 1

    centres = load_centres(out)
    assert centres["centres"].shape == (NUM_CLASSES, DIM) and (centres["K"], centres["D"]) == (NUM_CLASSES, DIM)
    assert centres["protocol"] == "gcd" and centres["features"]["path"] == str(tmp_path / "feats" / "features_train.pt")
    assert results["output_dir"] == str(out)
    preds = torch.load(out / SSK.PREDICTIONS_FILE, weights_only=True)
    assert preds["split_names"] == ["train", "test"]
    n_train, n_test = 30 * NUM_CLASSES, 10 * NUM_CLASSES
    assert preds["cluster"].shape == (n_train + n_test,)
    assert int((preds["split"] == 1).sum()) == n_test
    # labelled training images sit in their class's cluster (cluster j = labelled class j)
    is_train = preds["split"] == 0
    lab = preds["labelled"] & is_train
    assert torch.equal(preds["cluster"][lab], preds["label"][lab])
    assert (out / SSK.TSNE_FILE).stat().st_size > 0
    assert not list(out.glob("*.tmp"))


def test_reference_protocol_and_test_mode(tmp_path):
    write_features(tmp_path)
    common = ("--save-dir", str(tmp_path), "--experiment-idx", "feats", "--no-plots")
    assert SSK.main(parse(*common, "--ssk-protocol", "reference", "--K", "10")) == 0
    out = run_dir(tmp_path)
    results = read_results(out)
    assert results["protocol"] == "reference" and results["K"] == 10
    assert results["train"]["set"] == "all" and results["train"]["num_samples"] == 30 * NUM_CLASSES
    assert not (out / SSK.TSNE_FILE).exists()

    first = load_centres(out)["centres"]
    assert SSK.main(parse(*common, "--ssk-mode", "test", "--K", "10", "--ssk-protocol", "reference")) == 0
    results = read_results(out)
    assert results["mode"] == "test" and results["restart_inertia"] == [results["inertia"]]
    # started from converged centres: one Lloyd pass reproduces them
    assert torch.allclose(load_centres(out)["centres"], first, atol=1e-6)


def test_results_hold_face_clustering_scores_per_set(tmp_path, capsys):
    write_features(tmp_path)
    common = ("--save-dir", str(tmp_path), "--experiment-idx", "feats", "--no-plots")
    assert SSK.main(parse(*common, "--ssk-protocol", "reference", "--K", "10")) == 0
    out = run_dir(tmp_path)
    results = read_results(out)
    preds = torch.load(out / SSK.PREDICTIONS_FILE, weights_only=True)
    printed = capsys.readouterr().out
    keys = {"pairwise_precision", "pairwise_recall", "pairwise_f", "bcubed_precision", "bcubed_recall", "bcubed_f"}
    for split, (key, name) in enumerate((("train", "Train All"), ("test", "Test"))):
        scores = results[key][CLUSTERING_KEY]
        assert set(scores) == keys | {"nmi", "ari"}
        assert all(0.0 <= scores[k] <= 1.0 for k in keys | {"nmi"}) and -1.0 <= scores["ari"] <= 1.0
        rows = preds["split"] == split  # reference protocol: the whole training split is scored
        assert scores == clustering_scores(preds["label"][rows], preds["cluster"][rows])
        assert (
            f"K-Means {name} clustering: pairwise F {scores['pairwise_f']:.4f} | BCubed F {scores['bcubed_f']:.4f} | "
            f"NMI {scores['nmi']:.4f} | ARI {scores['ari']:.4f}"
        ) in printed
    # K = 10 > 8 separated classes: clusters are pure, some class is split
    assert results["train"][CLUSTERING_KEY]["pairwise_precision"] == 1.0
    assert results["train"][CLUSTERING_KEY]["pairwise_recall"] < 1.0


def _sha256(path: Path) -> str:
    return hashlib.sha256(torch.load(path, weights_only=True)["features"].numpy()).hexdigest()


def test_same_experiment_on_two_feature_folders_does_not_collide(tmp_path):
    """The reference passes one --experiment for every benchmark; each features folder keeps its own results."""
    write_features(tmp_path, "feats_a", seed=1)
    write_features(tmp_path, "feats_b", seed=5)
    for folder in ("feats_a", "feats_b"):
        argv = ("--save-dir", str(tmp_path), "--experiment-idx", folder, "--experiment", "GCD_base_prefix_gen")
        assert SSK.main(parse(*argv, "--no-plots")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats_a", "feats_b"]
    runs = {name: run_dir(tmp_path, name, "GCD_base_prefix_gen") for name in ("feats_a", "feats_b")}
    results = {name: read_results(folder) for name, folder in runs.items()}
    for name, folder in runs.items():
        train_file = tmp_path / name / "features_train.pt"
        assert results[name]["features"]["train"] == str(train_file)
        assert results[name]["train_features_sha256"] == _sha256(train_file)
        assert load_centres(folder)["features"]["sha256"] == _sha256(train_file)
        assert report.load_results(tmp_path / name) == results[name]
    assert results["feats_a"]["inertia"] != results["feats_b"]["inertia"]
    assert results["feats_a"]["train_features_sha256"] != results["feats_b"]["train_features_sha256"]
    assert not torch.equal(load_centres(runs["feats_a"])["centres"], load_centres(runs["feats_b"])["centres"])

    # within one features folder, another --experiment is another run
    argv = ("--save-dir", str(tmp_path), "--experiment-idx", "feats_a", "--experiment", "k10", "--K", "10")
    assert SSK.main(parse(*argv, "--no-plots")) == 0
    assert read_results(run_dir(tmp_path, "feats_a", "k10"))["K"] == 10
    assert read_results(runs["feats_a"]) == results["feats_a"]
    assert report.list_runs(tmp_path / "feats_a") == ["GCD_base_prefix_gen", "k10"]


def test_test_mode_starts_from_the_saved_centres(tmp_path, caplog):
    write_features(tmp_path)
    common = ("--save-dir", str(tmp_path), "--experiment-idx", "feats", "--no-plots")
    assert SSK.main(parse(*common)) == 0
    trained = read_results(run_dir(tmp_path))
    # one Lloyd iteration: from k-means++ seeds it could not reach the converged inertia, from the saved centres it does
    assert SSK.main(parse(*common, "--ssk-mode", "test", "--max-kmeans-iter", "1")) == 0
    tested = read_results(run_dir(tmp_path))
    assert tested["mode"] == "test" and tested["iterations"] == 1 and len(tested["restart_inertia"]) == 1
    assert tested["inertia"] == pytest.approx(trained["inertia"], rel=1e-6)
    assert tested["train"] == trained["train"] and tested["test"] == trained["test"]
    assert f"starting from the centres in {run_dir(tmp_path) / SSK.CENTRES_FILE}" in caplog.text


@pytest.mark.parametrize("case", ["other_folder", "re_extracted", "relabelled", "protocol"])
def test_test_mode_refuses_centres_fitted_on_other_features(tmp_path, caplog, case):
    write_features(tmp_path, "feats_a", seed=1)
    write_features(tmp_path, "feats_b", seed=5)
    fit = ("--save-dir", str(tmp_path), "--experiment-idx", "feats_a", "--experiment", "run", "--no-plots")
    assert SSK.main(parse(*fit)) == 0
    fitted = run_dir(tmp_path, "feats_a", "run") / SSK.CENTRES_FILE
    fitted_on = tmp_path / "feats_a" / "features_train.pt"
    target, protocol = "feats_a", "gcd"
    if case == "other_folder":  # another run's centres copied next to these features
        target = "feats_b"
        run_dir(tmp_path, target, "run").mkdir(parents=True)
        (run_dir(tmp_path, target, "run") / SSK.CENTRES_FILE).write_bytes(fitted.read_bytes())
    elif case == "re_extracted":  # same folder, new features written over the ones the centres were fitted on
        fitted_sha = _sha256(fitted_on)
        write_features(tmp_path, "feats_a", seed=5)
    elif case == "relabelled":  # same features, another labelled subset pinned
        payload = torch.load(fitted_on, weights_only=True)
        payload["labelled_mask"] = payload["labelled_mask"].roll(1)
        torch.save(payload, fitted_on)
    else:
        protocol = "reference"
    centres = run_dir(tmp_path, target, "run") / SSK.CENTRES_FILE
    before = centres.read_bytes()
    argv = ("--save-dir", str(tmp_path), "--experiment-idx", target, "--experiment", "run", "--no-plots")
    assert SSK.main(parse(*argv, "--ssk-mode", "test", "--ssk-protocol", protocol)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    if case == "protocol":
        assert "was fitted with --ssk-protocol gcd, this run uses reference" in errors[0]
    elif case == "relabelled":
        assert f"{centres} was fitted with another labelled subset on these features" in errors[0]
    else:
        clustered = tmp_path / target / "features_train.pt"
        assert f"{centres} was fitted on other features: {fitted_on} (240 x {DIM}" in errors[0]
        assert f"not the features being clustered, {clustered} (240 x {DIM}, sha256 {_sha256(clustered)})" in errors[0]
        if case == "re_extracted":
            assert fitted_sha in errors[0]
    assert centres.read_bytes() == before


def test_bare_tensor_centres_are_used_with_a_warning_only_when_their_shape_fits(tmp_path, caplog):
    write_features(tmp_path)
    common = ("--save-dir", str(tmp_path), "--experiment-idx", "feats", "--no-plots")
    assert SSK.main(parse(*common)) == 0
    centres_file = run_dir(tmp_path) / SSK.CENTRES_FILE
    converged = load_centres(run_dir(tmp_path))["centres"]
    torch.save(converged, centres_file)  # the reference's format
    assert SSK.main(parse(*common, "--ssk-mode", "test", "--max-kmeans-iter", "1")) == 0
    assert f"{centres_file} is a bare tensor (old format): its origin cannot be checked" in caplog.text
    assert load_centres(run_dir(tmp_path))["features"]["sha256"] == _sha256(tmp_path / "feats" / "features_train.pt")

    torch.save(converged[:, :-1], centres_file)
    caplog.clear()
    assert SSK.main(parse(*common, "--ssk-mode", "test")) == 2
    assert f"{centres_file} must hold ({NUM_CLASSES}, {DIM}) float centres for --K {NUM_CLASSES}" in caplog.text


@pytest.mark.parametrize(
    "case, match",
    [
        ("small_k", "--K 2 is smaller than the number of labelled classes M=4"),
        ("lengths", "mismatched lengths (features 240, labels 239"),
        ("nan", "NaN or infinite values in 1 of 240 rows"),
        ("missing", "features_train.pt not found; extract them first: torchrun"),
        ("no_centres", "--ssk-mode test needs"),
        ("width", "feature widths differ"),
        ("corrupt", "cannot read features file"),
        ("run_name", "--experiment '../up': SSK run name '../up' must be one plain folder name"),
        ("auto_empty_range", "the K search range is empty: --max-classes gives 4, which must exceed the smallest"),
        ("auto_min_below_m", "--min-classes 3 is below the number of labelled classes M=4"),
        ("auto_max_rows", "--max-classes 241 exceeds the number of training images (240)"),
        ("auto_no_labelled", "--K auto scores candidates on the labelled training images, and there are none"),
        ("auto_test_mode", "--K auto estimates K before a fit; --ssk-mode test starts from saved centres"),
        ("bounds_without_auto", "--min-classes and --max-classes: used only by --K auto (bounds of its search)"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, caplog, case, match):
    argv = ["--save-dir", str(tmp_path), "--experiment-idx", "feats", "--no-plots"]
    train = make_split("train", 30, 1)
    overrides = {
        "lengths": {"train": {"labels": train["labels"][:-1]}},
        "nan": {"train": {"features": train["features"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}},
        "width": {"test": {"features": torch.zeros(80, DIM + 1)}},
        "auto_no_labelled": {"train": {"labelled_mask": torch.zeros(240, dtype=torch.bool)}},
    }
    if case != "missing":
        write_features(tmp_path, **overrides.get(case, {}))
    if case == "corrupt":
        (tmp_path / "feats" / "features_test.pt").write_bytes(b"not a torch file")
    auto = ["--K", "auto"]
    argv += {
        "small_k": ["--K", "2"],
        "no_centres": ["--ssk-mode", "test"],
        "run_name": ["--experiment", "../up"],
        "auto_empty_range": [*auto, "--max-classes", "4"],
        "auto_min_below_m": [*auto, "--min-classes", "3"],
        "auto_max_rows": [*auto, "--max-classes", "241"],
        "auto_no_labelled": auto,
        "auto_test_mode": [*auto, "--ssk-mode", "test"],
        "bounds_without_auto": ["--min-classes", "5", "--max-classes", "12"],
    }.get(case, [])
    assert SSK.main(parse(*argv)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and match in errors[0]
    assert not list(tmp_path.rglob(report.RESULTS_FILE))


def test_k_auto_estimates_k_then_clusters_with_it(tmp_path, capsys):
    """GCD's estimator over the default range [M, 2 x stored identities] = [4, 16] finds the 8 separated classes."""
    write_features(tmp_path)
    argv = ("--save-dir", str(tmp_path), "--experiment-idx", "feats", "--K", "auto")
    assert SSK.main(parse(*argv)) == 0
    out = run_dir(tmp_path)
    results = read_results(out)
    est = results[K_ESTIMATION_KEY]
    assert (est["search"], est["min_K"], est["max_K"], est["true_K"]) == ("brent", NUM_KNOWN, 2 * NUM_CLASSES, 8)
    assert (est["n_init"], est["seed"]) == (SSK.K_ESTIMATION_INIT, results["seed"])
    assert est["num_labelled"] == int(make_split("train", 30, 1)["labelled_mask"].sum())
    accuracy = {point["K"]: point["labelled_acc"] for point in est["evaluated"]}
    assert len(accuracy) == len(est["evaluated"]) and all(NUM_KNOWN <= k <= 2 * NUM_CLASSES for k in accuracy)
    assert est["K"] == NUM_CLASSES and accuracy[NUM_CLASSES] == 1.0 and max(accuracy.values()) == 1.0
    assert results["K"] == NUM_CLASSES and load_centres(out)["K"] == NUM_CLASSES
    assert results["train"]["v2"]["all"] == 1.0
    printed = capsys.readouterr().out
    assert (
        f"K estimation (brent over [4, 16], {len(accuracy)} candidates): K = 8 (labelled accuracy 1.0000) | true K = 8"
    ) in printed
    with Image.open(out / SSK.K_ESTIMATION_FILE) as img:
        assert img.format == "PNG"
    assert (out / SSK.TSNE_FILE).stat().st_size > 0


def test_k_auto_search_stays_within_the_given_bounds(tmp_path):
    """A range that excludes the true K: the binary search picks the best K inside it and SSK clusters with that K."""
    write_features(tmp_path)
    argv = ("--save-dir", str(tmp_path), "--experiment-idx", "feats", "--no-plots", "--K", "auto")
    assert SSK.main(parse(*argv, "--k-search", "binary", "--min-classes", "9", "--max-classes", "12")) == 0
    out = run_dir(tmp_path)
    results = read_results(out)
    est = results[K_ESTIMATION_KEY]
    accuracy = {point["K"]: point["labelled_acc"] for point in est["evaluated"]}
    assert (est["search"], est["min_K"], est["max_K"], est["true_K"]) == ("binary", 9, 12, NUM_CLASSES)
    assert set(accuracy) <= set(range(9, 13)) and est["K"] in accuracy
    assert accuracy[est["K"]] == max(accuracy.values())
    assert results["K"] == est["K"] and load_centres(out)["centres"].shape == (est["K"], DIM)
    preds = torch.load(out / SSK.PREDICTIONS_FILE, weights_only=True)
    assert int(preds["cluster"].max()) < est["K"]
    assert not (out / SSK.K_ESTIMATION_FILE).exists()


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5"])
def test_k_flag_takes_a_positive_integer_or_auto(value, capsys):
    assert SSK.get_args_parser().parse_args(["--K", "AUTO"]).K == "auto"
    assert SSK.get_args_parser().parse_args(["--K", "12"]).K == 12
    with pytest.raises(SystemExit):
        SSK.get_args_parser().parse_args(["--K", value])
    assert f"expected a positive integer or 'auto', got '{value}'" in capsys.readouterr().err


def test_missing_features_are_computed_with_checkpoint(tmp_path, monkeypatch):
    import extract_features

    seen = {}

    def compute_split_features(args, device):
        seen.update(vars(args))
        return {"train": make_split("train", 30, 1), "test": make_split("test", 10, 2)}

    monkeypatch.setattr(extract_features, "compute_split_features", compute_split_features)
    argv = ["--save-dir", str(tmp_path), "--experiment-idx", "none", "--checkpoint-weights", "model_best.pth.tar"]
    assert SSK.main(parse(*argv, "--dataset", "synthfaces_tiny", "--no-plots")) == 0
    # a complete extraction namespace (its own defaults) with SSK's values on top
    defaults = vars(extract_features.get_args_parser(add_help=False).parse_args([]))
    assert set(defaults) <= set(seen)
    assert seen["checkpoint_weights"] == "model_best.pth.tar" and seen["dataset"] == "synthfaces_tiny"
    results = read_results(run_dir(tmp_path, "none"))
    assert results["features"]["train"].startswith("features computed from model_best.pth.tar")
    assert results["train"]["v2"]["all"] == 1.0


def test_reference_command_parses_and_names_the_features_folder(tmp_path, caplog):
    argv = (
        "--experiment GCD_base_prefix_gen --dataset youtubefaces_1000 --K 1000 --max_kmeans_iter 500 "
        "--k_means_init 10 --experiment_idx gcd_youtubefaces_1000_part_fvit_pretrain_prefix10 --save_dir results "
        "--data-path youtube_faces_1000"
    ).split()
    args = SSK.get_args_parser().parse_args(argv)
    assert (args.K, args.max_kmeans_iter, args.k_means_init, args.ssk_protocol) == (1000, 500, 10, "gcd")
    args.save_dir = str(tmp_path)
    assert SSK.main(args) == 2
    expected = tmp_path / "gcd_youtubefaces_1000_part_fvit_pretrain_prefix10" / "features_train.pt"
    assert f"features file {expected} not found" in caplog.text


@pytest.mark.parametrize(
    "canonical, aliases, value, dest, parsed",
    [
        ("--kmeans-restarts", ("--k_means_init", "--k-means-init"), "7", "k_means_init", 7),
        ("--kmeans-seeding", ("--kmeans-init",), "k-means||", "kmeans_init", "k-means||"),
        ("--max-kmeans-iter", ("--max_kmeans_iter",), "9", "max_kmeans_iter", 9),
        ("--save-dir", ("--save_dir",), "out", "save_dir", "out"),
        ("--experiment-idx", ("--experiment_idx",), "feats", "experiment_idx", "feats"),
        ("--checkpoint-weights", ("--checkpoint_weights",), "m.pth", "checkpoint_weights", "m.pth"),
        ("--ssk-mode", ("--ssk_mode",), "test", "ssk_mode", "test"),
        ("--ssk-protocol", ("--ssk_protocol",), "reference", "ssk_protocol", "reference"),
        ("--prop-train-labels", ("--prop_train_labels",), "0.3", "prop_train_labels", 0.3),
    ],
)
def test_hyphenated_flags_are_canonical_and_old_spellings_still_parse(canonical, aliases, value, dest, parsed):
    parser = SSK.get_args_parser()
    action = parser._option_string_actions[canonical]
    assert action.option_strings[0] == canonical and action.dest == dest
    for flag in (canonical, *aliases):
        assert getattr(parser.parse_args([flag, value]), dest) == parsed, flag


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "SSK.py", "--save-dir", str(tmp_path), "--experiment-idx", "absent", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "features_train.pt not found" in proc.stderr and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_torchrun_matches_single_process(tmp_path):
    write_features(tmp_path)
    common = [
        "--save-dir",
        str(tmp_path),
        "--experiment-idx",
        "feats",
        "--device",
        "cpu",
        "--no-plots",
        "--kmeans-restarts",
        "3",
        "--K",
        "10",
    ]
    assert SSK.main(SSK.get_args_parser().parse_args([*common, "--experiment", "single"])) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "SSK.py",
        *common,
        "--experiment",
        "dist",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, dist = read_results(run_dir(tmp_path, run="single")), read_results(run_dir(tmp_path, run="dist"))
    assert dist["world_size"] == 2
    for key in ("train", "test", "iterations", "best_restart"):
        assert dist[key] == single[key], key
    assert dist["inertia"] == pytest.approx(single["inertia"], rel=1e-5)
    p_single = torch.load(run_dir(tmp_path, run="single") / SSK.PREDICTIONS_FILE, weights_only=True)
    p_dist = torch.load(run_dir(tmp_path, run="dist") / SSK.PREDICTIONS_FILE, weights_only=True)
    assert torch.equal(p_single["cluster"], p_dist["cluster"])
    c_single, c_dist = load_centres(run_dir(tmp_path, run="single")), load_centres(run_dir(tmp_path, run="dist"))
    assert c_single["features"] == c_dist["features"]
    assert torch.allclose(c_single["centres"], c_dist["centres"], atol=1e-5)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_torchrun_k_auto_matches_single_process(tmp_path):
    """Sharded estimation: the labelled predictions are gathered, so both ranks walk the same candidates."""
    write_features(tmp_path)
    common = ["--save-dir", str(tmp_path), "--experiment-idx", "feats", "--device", "cpu", "--no-plots", "--K", "auto"]
    common += ["--k-search", "binary", "--k-estimation-init", "2", "--kmeans-restarts", "2"]
    assert SSK.main(SSK.get_args_parser().parse_args([*common, "--experiment", "single"])) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    proc = subprocess.run(
        [*cmd, "SSK.py", *common, "--experiment", "dist"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, dist = read_results(run_dir(tmp_path, run="single")), read_results(run_dir(tmp_path, run="dist"))
    assert dist["world_size"] == 2
    assert dist[K_ESTIMATION_KEY]["evaluated"] == single[K_ESTIMATION_KEY]["evaluated"]
    assert dist["K"] == single["K"] == single[K_ESTIMATION_KEY]["K"]
    assert dist["train"] == single["train"] and dist["test"] == single["test"]
