"""Clustering accuracy (v1 / v2 / class-balanced v2) against hand-computed examples."""

import logging

import numpy as np
import pytest
import torch

from utils.metrics import (
    MetricVariant,
    cluster_acc,
    contingency_matrix,
    evaluate_clustering,
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
    with caplog.at_level(logging.WARNING, logger="utils.metrics"):
        res = evaluate_clustering([0, 0, 1], [1, 1, 0], [True, True, True], ("v2", "v1", "v2b"))
    assert "no sample of an unknown (new) class" in caplog.text
    for variant in ("v2", "v1", "v2b"):
        assert res[variant]["new"] is None
        assert res[variant]["old"] == pytest.approx(1.0)
        assert res[variant]["all"] == pytest.approx(1.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.metrics"):
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
