"""Tests for utils/evaluation/roc.py: ROC points, TAR@FAR's closest-point rule and ties, table and figure."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve as sklearn_roc_curve

from utils.evaluation.roc import (
    PLOT_POINTS,
    RocCurve,
    _plot_points,
    closest_point_index,
    far_label,
    format_tar_table,
    plot_roc,
    roc_curve,
    tar_at_far,
)

# Six pairs, sorted by score: 0.9 imp, 0.8 gen, 0.7 imp, 0.6 imp, 0.5 gen, 0.4 imp (2 genuine, 4 impostor).
# Accepting score >= s for s = 0.9 .. 0.4 gives FP = 1 1 2 3 3 4 and TP = 0 1 1 1 2 2, so with (0, 0) first:
# FPR = 0 .25 .25 .5 .75 .75 1 and TPR = 0 0 .5 .5 .5 1 1.
SCORES = np.array([0.5, 0.9, 0.4, 0.8, 0.6, 0.7])
LABELS = np.array([1, 0, 0, 1, 0, 0])
FPR = [0, 0.25, 0.25, 0.5, 0.75, 0.75, 1]
TPR = [0, 0, 0.5, 0.5, 0.5, 1, 1]


def test_roc_points_by_hand():
    curve = roc_curve(SCORES, LABELS, drop_intermediate=False)
    np.testing.assert_array_equal(curve.fpr, FPR)
    np.testing.assert_array_equal(curve.tpr, TPR)
    np.testing.assert_array_equal(curve.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert (curve.num_positive, curve.num_negative) == (2, 4)
    # Trapezoids over FPR 0-.25 (TPR 0), .25-.5 (.5), .5-.75 (.5), .75-1 (1): 0 + .125 + .125 + .25 = 0.5, the chance
    # that a genuine pair outscores an impostor: 0.8 beats 3 of 4, 0.5 beats 1 of 4.
    assert curve.auc() == pytest.approx(0.5)


def test_tied_scores_enter_together():
    # Scores 0.8 (gen), 0.8 (imp), 0.3 (gen), 0.3 (imp): two threshold points, each taking a genuine and an impostor.
    curve = roc_curve(torch.tensor([0.8, 0.3, 0.8, 0.3]), torch.tensor([True, False, False, True]))
    np.testing.assert_array_equal(curve.fpr, [0, 0.5, 1])
    np.testing.assert_array_equal(curve.tpr, [0, 0.5, 1])


def test_drop_intermediate_by_hand():
    # FP = 1 1 2 3 3 4, TP = 0 1 1 1 2 2: steps (0,1) (1,0) (1,0) (0,1) (1,0); the point after the two equal steps
    # (1,0),(1,0) (FP 2, TP 1) is the only one dropped. Dropping is the default, as sklearn's.
    curve = roc_curve(SCORES, LABELS)
    np.testing.assert_array_equal(curve.fpr, [0, 0.25, 0.25, 0.75, 0.75, 1])
    np.testing.assert_array_equal(curve.tpr, [0, 0, 0.5, 0.5, 1, 1])


# A dozen pairs, sorted by score (G genuine, I impostor; 4 genuine, 8 impostor):
#   0.95 G, 0.90 I, 0.85 G, 0.80 I, 0.75 I, 0.70 I, 0.65 I, 0.60 G, 0.55 I, 0.50 G, 0.45 I, 0.40 I
# Accepting score >= s for each s from the top gives (FP, TP) = (0,1) (1,1) (1,2) (2,2) (3,2) (4,2) (5,2) (5,3) (6,3)
# (6,4) (7,4) (8,4). Steps between them: (1,0) (0,1) (1,0) (1,0) (1,0) (1,0) (0,1) (1,0) (0,1) (1,0) (1,0).
# sklearn's drop_intermediate keeps the first and last points and each point whose step in and step out differ:
# (0,1) (1,1) (1,2) (5,2) (5,3) (6,3) (6,4) (8,4); it drops (2,2) (3,2) (4,2) inside the horizontal run from FP 1 to 5
# at TP 2, and (7,4). With (0, 0) first, FPR = FP / 8 and TPR = TP / 4:
#   exact:    FPR 0 0 .125 .125 .25 .375 .5 .625 .625 .75 .75 .875 1,  TPR 0 .25 .25 .5 .5 .5 .5 .5 .75 .75 1 1 1
#   thinned:  FPR 0 0 .125 .125 .625 .625 .75 .75 1,                    TPR 0 .25 .25 .5 .5 .75 .75 1 1
DOZEN_SCORES = [0.75, 0.95, 0.4, 0.6, 0.9, 0.55, 0.85, 0.45, 0.7, 0.5, 0.8, 0.65]
DOZEN_LABELS = [0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]


def test_a_dozen_scores_by_hand_both_rules():
    thinned = roc_curve(DOZEN_SCORES, DOZEN_LABELS)
    np.testing.assert_array_equal(thinned.fpr, [0, 0, 0.125, 0.125, 0.625, 0.625, 0.75, 0.75, 1])
    np.testing.assert_array_equal(thinned.tpr, [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1, 1])
    exact = roc_curve(DOZEN_SCORES, DOZEN_LABELS, drop_intermediate=False)
    np.testing.assert_array_equal(exact.fpr, [0, 0, 0.125, 0.125, 0.25, 0.375, 0.5, 0.625, 0.625, 0.75, 0.75, 0.875, 1])
    np.testing.assert_array_equal(exact.tpr, [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.75, 0.75, 1, 1, 1])
    # FAR 0.5: the exact ROC has the point FPR 0.5 (TPR 0.5); on the thinned one FPR .625 (distance .125) beats .125
    # (.375), and of its two points the last, TPR .75, wins. FAR 0.1: FPR .125 on both, last point TPR .5. FAR 0.3:
    # exact .25 (distance .05) -> .5; thinned .125 (.175) beats .625 (.325) -> .5. FAR 0.9: exact .875 (.025) -> 1;
    # thinned 1 (.1) beats .75 (.15) -> 1.
    fars = (0.1, 0.3, 0.5, 0.9)
    assert tar_at_far(DOZEN_SCORES, DOZEN_LABELS, fars) == {0.1: 0.5, 0.3: 0.5, 0.5: 0.75, 0.9: 1.0}
    assert tar_at_far(DOZEN_SCORES, DOZEN_LABELS, fars, drop_intermediate=False) == {
        0.1: 0.5,
        0.3: 0.5,
        0.5: 0.5,
        0.9: 1.0,
    }
    fpr, tpr, _ = sklearn_roc_curve(DOZEN_LABELS, DOZEN_SCORES)  # sklearn's default agrees with the hand-thinned curve
    np.testing.assert_array_equal(fpr, thinned.fpr)
    np.testing.assert_array_equal(tpr, thinned.tpr)


@pytest.mark.parametrize("drop", [False, True])
def test_roc_matches_sklearn_with_ties(drop):
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=3000), 1).astype(np.float32)  # many ties
    labels = rng.random(3000) < 0.2
    ours = roc_curve(torch.from_numpy(scores), torch.from_numpy(labels), drop_intermediate=drop)
    fpr, tpr, thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=drop)
    np.testing.assert_array_equal(ours.fpr, fpr)
    np.testing.assert_array_equal(ours.tpr, tpr)
    np.testing.assert_array_equal(ours.thresholds, thresholds)


def test_tar_at_far_closest_point_and_ties():
    curve = roc_curve(SCORES, LABELS, drop_intermediate=False)
    # 0.5 is on the curve: FPR 0.5 -> TPR 0.5.
    # 0.125 is equally close to FPR 0 (points 0, 1) and 0.25 (points 1, 2): the last such point, TPR 0.5, wins.
    # 0.625 is equally close to 0.5 (point 3) and 0.75 (points 4, 5): the last, TPR 1.
    # 0.75 hits the vertical run at FPR 0.75 (TPR 0.5 and 1): the largest TPR, 1.
    # 0.9 is closest to 1 (distance .1 vs .15): TPR 1; 0.01 is closest to FPR 0: the last point there, TPR 0.
    fars = (0.5, 0.125, 0.625, 0.75, 0.9, 0.01)
    assert tar_at_far(curve, fars=fars) == {0.5: 0.5, 0.125: 0.5, 0.625: 1.0, 0.75: 1.0, 0.9: 1.0, 0.01: 0.0}
    assert closest_point_index(curve, 0.125) == 2
    assert tar_at_far(SCORES, LABELS, fars, drop_intermediate=False) == tar_at_far(curve, fars=fars)


def test_tar_at_far_drop_intermediate_changes_the_closest_point():
    # Kept points FPR 0 .25 .25 .75 .75 1: for 0.5 the closest are .25 and .75 (distance .25): the last is TPR 1,
    # where the full curve has the exact point FPR 0.5, TPR 0.5.
    assert tar_at_far(SCORES, LABELS, (0.5,), drop_intermediate=False) == {0.5: 0.5}
    assert tar_at_far(SCORES, LABELS, (0.5,)) == {0.5: 1.0}


def test_tar_at_far_matches_insightface_procedure():
    # insightface ijb_evals.py: sklearn ROC (drop_intermediate=True), np.flipud, tpr[np.argmin(abs(fpr - far))].
    rng = np.random.default_rng(1)
    labels = rng.random(20000) < 0.05
    scores = np.round(rng.normal(size=20000) + 1.5 * labels, 2)
    fpr, tpr, _ = sklearn_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    expected = {far: float(tpr[np.argmin(np.abs(fpr - far))]) for far in fars}
    assert tar_at_far(scores, labels, fars) == expected  # the default is insightface's rule


def test_bad_inputs():
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        roc_curve([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="finite"):
        roc_curve([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        roc_curve([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tar_at_far(SCORES, LABELS, (1.5,))
    with pytest.raises(ValueError, match="labels are required"):
        tar_at_far(SCORES)


def test_markdown_table():
    text = format_tar_table({"A": {1e-4: 0.5, 0.1: 0.98765}, "B": {1e-4: 0.0, 0.1: 1.0}})
    assert text == (
        "| Method | TAR@FAR=1e-4 | TAR@FAR=1e-1 |\n"
        "|---|---:|---:|\n"
        "| A | 50.00 | 98.77 |\n"
        "| B | 0.00 | 100.00 |\n"
    )
    assert far_label(0.25) == "0.25"
    with pytest.raises(ValueError, match="FARs"):
        format_tar_table({"A": {1e-4: 0.5}, "B": {1e-3: 0.5}})


def test_plot_thins_long_curves_keeping_the_highest_tpr(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.random(200_000) < 0.01
    curve = roc_curve(rng.normal(size=200_000) + 2.0 * labels, labels, drop_intermediate=False)
    assert len(curve.fpr) > PLOT_POINTS
    fpr, tpr = _plot_points(curve, 1e-6)
    assert 0 < len(fpr) <= PLOT_POINTS and (fpr > 0).all() and (np.diff(fpr) >= 0).all()
    # Each kept point is the last of its FPR on the full curve, i.e. the highest TPR at that FPR.
    last_of_fpr = np.searchsorted(curve.fpr, fpr, side="right") - 1
    np.testing.assert_array_equal(tpr, curve.tpr[last_of_fpr])
    short = RocCurve(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0]), np.array([np.inf, 1.0, 0.0]), 1, 2)
    out = plot_roc({"long": curve, "short": short}, tmp_path / "roc.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
