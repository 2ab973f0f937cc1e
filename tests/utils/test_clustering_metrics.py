"""Clustering accuracy (v1 / v2 / class-balanced v2) and face-clustering scores against hand-computed examples."""

import logging
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk_metrics

from utils.evaluation.clustering import (
    MetricVariant,
    adjusted_rand_index,
    bcubed_scores,
    cluster_acc,
    clustering_scores,
    contingency_matrix,
    evaluate_clustering,
    normalized_mutual_info,
    pairwise_scores,
    split_cluster_acc_v1,
    split_cluster_acc_v2,
    split_cluster_acc_v2_balanced,
)

# Class 0 is known (4 samples), class 1 is new (3 samples). Cluster 0 holds all of class 0 and two of class 1.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1]
Y_PRED = [0, 0, 0, 0, 0, 0, 1]
KNOWN = [True, True, True, True, False, False, False]


def test_cluster_acc_is_permutation_invariant_and_accepts_tensors():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([2, 2, 0, 0, 1, 1])
    assert cluster_acc(y_true, y_pred) == 1.0
    assert cluster_acc(torch.from_numpy(y_true), torch.from_numpy(y_pred)) == 1.0
    # one mistake out of six: best map 2->0, 0->1, 1->2 still matches five samples
    assert cluster_acc([0, 0, 1, 1, 2, 2], [2, 2, 0, 1, 1, 1]) == pytest.approx(5 / 6)


def test_contingency_matrix_is_square_and_zero_padded():
    w = contingency_matrix(np.array([0, 0, 1]), np.array([5, 5, 7]))
    assert w.shape == (8, 8)
    assert w[5, 0] == 2 and w[7, 1] == 1 and w.sum() == 3
    assert cluster_acc([0, 0, 1], [5, 5, 7]) == 1.0


def test_v2_uses_one_matching():
    # pi(0) = 0 (4 samples), pi(1) = 1 (1 sample): All 5/7, Old 4/4, New 1/3
    acc = split_cluster_acc_v2(Y_TRUE, Y_PRED, KNOWN)
    assert acc.all == pytest.approx(5 / 7)
    assert acc.old == pytest.approx(1.0)
    assert acc.new == pytest.approx(1 / 3)


def test_v1_matches_old_and_new_separately_and_differs_from_v2():
    # Old: [0,0,0,0] vs [0,0,0,0] -> 1; New: [1,1,1] vs [0,0,1] -> cluster 0 reused -> 2/3; All = 4/7 + 3/7 * 2/3
    acc = split_cluster_acc_v1(Y_TRUE, Y_PRED, KNOWN)
    assert acc.old == pytest.approx(1.0)
    assert acc.new == pytest.approx(2 / 3)
    assert acc.all == pytest.approx(6 / 7)
    assert acc.all != pytest.approx(split_cluster_acc_v2(Y_TRUE, Y_PRED, KNOWN).all)


def test_v2_balanced_averages_per_class_accuracy():
    # per class under the v2 matching: class 0 -> 1, class 1 -> 1/3
    acc = split_cluster_acc_v2_balanced(Y_TRUE, Y_PRED, KNOWN)
    assert acc.all == pytest.approx((1 + 1 / 3) / 2)
    assert acc.old == pytest.approx(1.0)
    assert acc.new == pytest.approx(1 / 3)


def test_evaluate_clustering_structure_and_order():
    res = evaluate_clustering(torch.tensor(Y_TRUE), torch.tensor(Y_PRED), torch.tensor(KNOWN), ("v2", "v1", "v2b"))
    assert list(res) == ["v2", "v1", "v2b"]
    assert set(res["v2"]) == {"all", "old", "new"}
    assert res["v2"]["all"] == pytest.approx(5 / 7)
    assert res["v1"]["all"] == pytest.approx(6 / 7)
    assert list(evaluate_clustering(Y_TRUE, Y_PRED, KNOWN, (MetricVariant.V1,))) == ["v1"]


def test_missing_old_or_new_gives_none_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.evaluation.clustering"):
        res = evaluate_clustering([0, 0, 1], [1, 1, 0], [True, True, True], ("v2", "v1", "v2b"))
    assert "no sample of an unknown (new) class" in caplog.text
    for variant in ("v2", "v1", "v2b"):
        assert res[variant]["new"] is None
        assert res[variant]["old"] == pytest.approx(1.0)
        assert res[variant]["all"] == pytest.approx(1.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.evaluation.clustering"):
        res = evaluate_clustering([2, 2, 3], [0, 0, 0], [False, False, False])
    assert "no sample of a known (old) class" in caplog.text
    assert res["v2"]["old"] is None and res["v1"]["old"] is None
    assert res["v2"]["new"] == pytest.approx(2 / 3)
    assert res["v1"]["all"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "y_true, y_pred, known, match",
    [
        ([0, 1], [0], [True, True], "same length"),
        ([0, -1], [0, 1], [True, True], "non-negative"),
        ([0.0, 1.0], [0, 1], [True, True], "integer"),
        ([0, 1], [0, 1], [1, 0], "boolean"),
        ([], [], [], "empty"),
    ],
)
def test_bad_inputs(y_true, y_pred, known, match):
    with pytest.raises(ValueError, match=match):
        split_cluster_acc_v2(np.array(y_true), np.array(y_pred), np.array(known))


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="v1, v2, v2b"):
        evaluate_clustering(Y_TRUE, Y_PRED, KNOWN, ("v3",))


# Truth [0,0,0,1,1,2] vs prediction [0,0,1,1,2,2]. Cells n_kc: cluster 0 = {class 0: 2}, cluster 1 = {class 0: 1,
# class 1: 1}, cluster 2 = {class 1: 1, class 2: 1}; cluster sizes a = (2, 2, 2), class sizes b = (3, 2, 1).
FACE_TRUE = [0, 0, 0, 1, 1, 2]
FACE_PRED = [0, 0, 1, 1, 2, 2]
SCORE_KEYS = {
    "pairwise_precision",
    "pairwise_recall",
    "pairwise_f",
    "bcubed_precision",
    "bcubed_recall",
    "bcubed_f",
    "nmi",
    "ari",
}


def test_pairwise_scores_by_hand():
    # TP = C(2,2) = 1; predicted pairs = 3 * C(2,2) = 3; true pairs = C(3,2) + C(2,2) + C(1,2) = 3 + 1 + 0 = 4
    # P = 1/3, R = 1/4, F = 2 * (1/12) / (7/12) = 2/7
    assert tuple(pairwise_scores(FACE_TRUE, FACE_PRED)) == pytest.approx((1 / 3, 1 / 4, 2 / 7))


def test_bcubed_scores_by_hand():
    # P = (1/6) (2^2/2 + 1^2/2 + 1^2/2 + 1^2/2 + 1^2/2) = (1/6) * 4 = 2/3
    # R = (1/6) (2^2/3 + 1^2/3 + 1^2/2 + 1^2/2 + 1^2/1) = (1/6) * 11/3 = 11/18; F = 2PR / (P + R) = 44/69
    assert tuple(bcubed_scores(FACE_TRUE, FACE_PRED)) == pytest.approx((2 / 3, 11 / 18, 44 / 69))


def test_nmi_and_ari_by_hand():
    # MI = sum (n_kc/n) ln(n n_kc / (a_k b_c)) = (2/6) ln 2 + (1/6) ln 1 + (1/6) ln 1.5 + (1/6) ln 1.5 + (1/6) ln 3
    mutual = math.log(2) / 3 + math.log(1.5) / 3 + math.log(3) / 6
    h_true = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)
    h_pred = math.log(3)
    assert normalized_mutual_info(FACE_TRUE, FACE_PRED) == pytest.approx(mutual / ((h_true + h_pred) / 2))
    # index = 1, expected = 3 * 4 / C(6,2) = 0.8, max = (3 + 4) / 2 = 3.5: ARI = 0.2 / 2.7 = 2/27
    assert adjusted_rand_index(FACE_TRUE, FACE_PRED) == pytest.approx(2 / 27)


def test_clustering_scores_collects_all_eight():
    scores = clustering_scores(torch.tensor(FACE_TRUE), torch.tensor(FACE_PRED))
    assert set(scores) == SCORE_KEYS
    assert all(isinstance(v, float) for v in scores.values())
    assert scores["pairwise_f"] == pytest.approx(2 / 7)
    assert scores["bcubed_recall"] == pytest.approx(11 / 18)
    assert scores["ari"] == pytest.approx(2 / 27)


@pytest.mark.parametrize("y_true", [[0, 0, 1, 1, 2, 2], [0, 1, 2, 3], [5, 5, 5], [4]])
def test_identical_partitions_score_one(y_true):
    # includes the degenerate single cluster ([5,5,5]), all singletons ([0,1,2,3]) and a single sample ([4])
    relabelled = [10 - label for label in y_true]
    for y_pred in (y_true, relabelled):
        assert clustering_scores(y_true, y_pred) == pytest.approx(dict.fromkeys(SCORE_KEYS, 1.0))


def test_one_cluster_for_everything():
    # 4 samples of 2 classes in one cluster: TP = 1 + 1 = 2 of C(4,2) = 6 predicted pairs; BCubed P = (4 + 4) / 4 / 4
    scores = clustering_scores([0, 0, 1, 1], [0, 0, 0, 0])
    assert scores["pairwise_precision"] == pytest.approx(1 / 3) and scores["pairwise_recall"] == 1.0
    assert scores["bcubed_precision"] == pytest.approx(0.5) and scores["bcubed_recall"] == 1.0
    assert scores["nmi"] == 0.0  # prediction entropy 0, truth entropy ln 2
    assert scores["ari"] == pytest.approx(0.0)  # index = expected = 2


def test_all_singletons():
    # no predicted pair: pairwise precision 1 by convention, recall 0 / 2 = 0, F 0; BCubed P = 1, R = (1/4)(4 * 1/2)
    scores = clustering_scores([0, 0, 1, 1], [0, 1, 2, 3])
    assert (scores["pairwise_precision"], scores["pairwise_recall"], scores["pairwise_f"]) == (1.0, 0.0, 0.0)
    assert scores["bcubed_precision"] == 1.0 and scores["bcubed_recall"] == pytest.approx(0.5)
    assert scores["nmi"] == pytest.approx(math.log(2) / ((math.log(2) + math.log(4)) / 2))
    assert scores["ari"] == pytest.approx(0.0)


def test_clustering_scores_are_label_permutation_invariant():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 6, 200), rng.integers(0, 8, 200)
    base = clustering_scores(y_true, y_pred)
    permuted = clustering_scores(rng.permutation(6)[y_true] + 3, rng.permutation(8)[y_pred] * 7)
    assert permuted == pytest.approx(base)
    swapped = clustering_scores(y_pred, y_true)  # swapping roles swaps precision and recall
    assert swapped["pairwise_precision"] == pytest.approx(base["pairwise_recall"])
    assert swapped["bcubed_recall"] == pytest.approx(base["bcubed_precision"])
    assert swapped["nmi"] == pytest.approx(base["nmi"]) and swapped["ari"] == pytest.approx(base["ari"])


@pytest.mark.parametrize("seed, num_classes, num_clusters, n", [(0, 5, 5, 50), (1, 30, 12, 1000), (2, 2, 40, 300)])
def test_nmi_and_ari_match_sklearn(seed, num_classes, num_clusters, n):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, num_classes, n), rng.integers(0, num_clusters, n)
    y_pred[: n // 2] = y_true[: n // 2]  # some agreement, so the scores are not all near 0
    scores = clustering_scores(y_true, y_pred)
    assert scores["nmi"] == pytest.approx(sk_metrics.normalized_mutual_info_score(y_true, y_pred), abs=1e-10)
    assert scores["ari"] == pytest.approx(sk_metrics.adjusted_rand_score(y_true, y_pred), abs=1e-10)
    assert sk_metrics.adjusted_rand_score([0, 0], [0, 1]) == adjusted_rand_index([0, 0], [0, 1])


def test_clustering_scores_reject_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        clustering_scores([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        clustering_scores([], [])
