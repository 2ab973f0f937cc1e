"""K estimation (GCD's estimator): the integer searches, the labelled-accuracy objective on Gaussian blobs, errors."""

import logging
import math

import pytest
import torch
from PIL import Image

from utils.k_estimation import (
    CachedObjective,
    KEstimate,
    binary_search,
    brent_search,
    estimate_k,
    plot_k_estimation,
)

SEARCHES = {"brent": brent_search, "binary": binary_search}
SIZES = list(range(10, 81, 5))  # 15 classes of 10, 15, ..., 80 points
NUM_NEW = 5  # classes 0..4, the five smallest, are unknown (never labelled)


def make_unbalanced_blobs(seed: int = 0, dim: int = 16) -> dict[str, torch.Tensor]:
    """15 well-separated Gaussian classes of 10 to 80 points, shuffled; half the points of the 10 known classes
    (the larger ones) labelled.

    The labelled accuracy only sees what k-means does to known classes: merging two known classes (K < 15) or
    splitting one (K > 15) lowers it, while merging or splitting unknown classes does not. GCD's estimator relies on
    the known classes being representative of the rest, so here the unknown classes are the small ones and lie far
    out (mean scale 15 vs 6, spread 0.3): the cheapest merge joins two known classes and the cheapest split (largest
    n * variance) cuts a large known class, and the labelled accuracy peaks at exactly K = 15.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(SIZES)
    scale = torch.full((len(SIZES), 1), 6.0)
    scale[:NUM_NEW] = 15.0
    means = torch.randn(len(SIZES), dim, generator=gen) * scale
    labels = torch.arange(len(SIZES)).repeat_interleave(sizes)
    x = means[labels] + 0.3 * torch.randn(labels.numel(), dim, generator=gen)
    perm = torch.randperm(labels.numel(), generator=gen)
    x, labels = x[perm], labels[perm]
    labelled = (labels >= NUM_NEW) & (torch.rand(labels.numel(), generator=gen) < 0.5)
    return {"x": x, "labels": labels, "labelled": labelled}


@pytest.fixture(scope="module")
def blobs():
    return make_unbalanced_blobs()


def counting(fn):
    """``CachedObjective`` over ``fn`` plus the list of K values ``fn`` itself received."""
    calls = []

    def wrapped(k: int) -> float:
        calls.append(k)
        return fn(k)

    return CachedObjective(wrapped), calls


def test_binary_search_follows_the_slope_at_the_midpoint():
    # peak at 6 on [1, 8]: mid 4, f(4) < f(5) -> [5, 8]; mid 6, f(6) >= f(7) -> [5, 6]; mid 5, f(5) < f(6) -> [6, 6]
    objective, calls = counting(lambda k: -abs(k - 6))
    assert binary_search(objective, 1, 8) == 6
    assert calls == [4, 5, 6, 7]  # 5 and 6 are asked again in the last step and come from the cache


@pytest.mark.parametrize("name", sorted(SEARCHES))
@pytest.mark.parametrize("lo, hi", [(10, 30), (1000, 4000)])
def test_searches_find_every_peak_of_a_unimodal_curve(name, lo, hi):
    """Every peak position, including both bounds, with a V-shaped and a skewed (steep left, flat right) curve."""
    step = max(1, (hi - lo) // 60)
    for peak in [*range(lo, hi + 1, step), hi]:
        for curve in (lambda k: -abs(k - peak), lambda k: -((k - peak) ** 2) if k < peak else -0.01 * (k - peak)):
            objective, calls = counting(curve)
            assert SEARCHES[name](objective, lo, hi) == peak, (peak, calls)
            assert len(calls) == len(set(calls)), "a K was evaluated twice"
            assert all(lo <= k <= hi for k in calls)
            # binary: at most 2 ceil(log2(width)) (2 * 12 = 24 for 3001 values); Brent: golden-section rate, ~17
            assert len(calls) <= 2 * math.ceil(math.log2(hi - lo + 1)), (peak, calls)


def test_brent_needs_about_log_golden_candidates():
    """The rounded objective is flat within an integer; Brent must not collapse onto the first integer it likes."""
    lo, hi = 1000, 4000
    worst = 0
    for peak in range(lo, hi + 1, 50):
        objective, calls = counting(lambda k: -abs(k - peak))
        assert brent_search(objective, lo, hi) == peak
        worst = max(worst, len(calls))
    # golden section shrinks the bracket by 0.618 per step: log(3001 / 4) / log(1.618) = 13.8 steps, plus the climb
    assert 10 <= worst <= 20


def test_ties_go_to_the_smaller_k():
    plateau = {12: 0.9, 13: 1.0, 14: 1.0, 15: 1.0, 16: 0.8}
    objective, _ = counting(lambda k: plateau.get(k, 0.5))
    assert binary_search(objective, 10, 20) == 13  # acc(mid) >= acc(mid + 1) keeps the lower half
    for k in (15, 14, 16, 13):
        objective(k)
    assert objective.best() == 13


def test_estimator_finds_true_k_on_unbalanced_blobs(blobs, caplog):
    with caplog.at_level(logging.INFO, logger="utils.kmeans"):
        estimates = {
            name: estimate_k(blobs["x"], blobs["labels"], blobs["labelled"], 30, search=name, n_init=10, device="cpu")
            for name in SEARCHES
        }
    fits = [r.getMessage() for r in caplog.records if r.name == "utils.kmeans" and r.getMessage().startswith("k-means")]
    for name, est in estimates.items():
        ks = [k for k, _ in est.evaluated]
        assert est.k == len(SIZES), (name, est.evaluated)
        assert (est.search, est.min_k, est.max_k) == (name, len(SIZES) - NUM_NEW, 30)  # min_k defaults to M = 10
        assert est.num_labelled_classes == 10 and est.num_labelled == int(blobs["labelled"].sum())
        assert len(ks) == len(set(ks)) and all(10 <= k <= 30 for k in ks)
        accuracy = dict(est.evaluated)
        assert accuracy[15] == 1.0 and all(acc < 1.0 for k, acc in accuracy.items() if k != 15)
        assert len(ks) <= 2 * math.ceil(math.log2(21))  # 10 of the 21 integers of [10, 30]
    # one k-means fit (one "k-means (K=...)" log line) per evaluated candidate, no fit repeated
    assert len(fits) == sum(len(est.evaluated) for est in estimates.values())


def test_estimate_is_deterministic_and_respects_bounds(blobs):
    args = (blobs["x"], blobs["labels"], blobs["labelled"], 19, 16)
    first = estimate_k(*args, search="brent", n_init=2, device="cpu", progress=False)
    again = estimate_k(*args, search="brent", n_init=2, device="cpu", progress=False)
    assert first.evaluated == again.evaluated
    assert all(16 <= k <= 19 for k, _ in first.evaluated) and 16 <= first.k <= 19
    assert first.k == max(dict(first.evaluated).items(), key=lambda item: (item[1], -item[0]))[0]
    entry = first.to_dict()
    assert entry["K"] == first.k and (entry["min_K"], entry["max_K"]) == (16, 19) and entry["search"] == "brent"
    assert entry["evaluated"] == [{"K": k, "labelled_acc": acc} for k, acc in first.evaluated]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_k": 10}, "max_k=10 must exceed min_k=10"),
        ({"max_k": 20, "min_k": 9}, "min_k=9 is below the number of labelled classes M=10"),
        ({"max_k": 676}, r"max_k=676 exceeds the number of points \(675\)"),
        ({"max_k": 20, "search": "golden"}, "search must be one of brent, binary; got 'golden'"),
        ({"max_k": 20, "labelled_mask": "none"}, "K estimation needs labelled points"),
        ({"max_k": 20, "labelled_mask": "float"}, "labelled_mask must be a bool tensor of shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(blobs, kwargs, match):
    mask = {"none": torch.zeros_like(blobs["labelled"]), "float": blobs["labelled"].float()}
    kwargs = dict(kwargs)
    labelled = mask.get(kwargs.pop("labelled_mask", None), blobs["labelled"])
    with pytest.raises(ValueError, match=match):
        estimate_k(blobs["x"], blobs["labels"], labelled, device="cpu", progress=False, **kwargs)


@pytest.mark.parametrize("name", sorted(SEARCHES))
@pytest.mark.parametrize("lo, hi", [(5, 5), (6, 5), (0, 5)])
def test_searches_refuse_empty_or_nonpositive_ranges(name, lo, hi):
    with pytest.raises(ValueError, match=rf"need 1 <= lower bound < upper bound for a K search, got \[{lo}, {hi}\]"):
        SEARCHES[name](CachedObjective(float), lo, hi)


def test_best_needs_an_evaluation():
    with pytest.raises(ValueError, match="no K has been evaluated yet"):
        CachedObjective(float).best()


def test_plot_marks_chosen_and_true_k(tmp_path):
    est = KEstimate(
        k=14,
        search="binary",
        min_k=10,
        max_k=30,
        evaluated=[(20, 0.7), (21, 0.68), (15, 0.9), (14, 0.95), (12, 0.8), (13, 0.85)],
        num_labelled=300,
        num_labelled_classes=10,
        seconds=1.0,
    )
    out = plot_k_estimation(est, tmp_path / "k.png", true_k=15)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 400
