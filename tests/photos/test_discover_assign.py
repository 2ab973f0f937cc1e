"""Naming the clusters of discover.py, worked out by hand on points in the plane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from photos.assign import discover_people, parse_k

POINTS = torch.tensor(
    [[10.0, 0], [0, 10], [9, 0], [11, 0], [-10, 0], [-10, 1], [-10, -1], [0, -10], [0, 9]]
)  # fmt: skip
GALLERY = ["ann", "bob", None, None, None, None, None, None, None]


def test_known_names_new_people_by_size_and_distances():
    """Clusters {ann, (9,0), (11,0)}, {bob, (0,9)}, {the three at x = -10}, {(0,-10)}: the three-face new cluster is
    new_001, the single one new_002. (9, 0) lies 1 from ann's centre (10, 0) and sqrt(9^2 + 9.5^2) = 13.09 from bob's
    (0, 9.5): a ratio of 0.076, flagged at --low-confidence-ratio 0.05, not at 0.9."""
    found = discover_people(POINTS, GALLERY, ["bob", "ann"], 4, n_init=4, progress=False)
    assert found.person == ["ann", "bob", "ann", "ann", "new_001", "new_001", "new_001", "new_002", "bob"]
    assert found.people == ["bob", "ann", "new_001", "new_002"] and found.known == ["bob", "ann"]
    np.testing.assert_allclose(found.distance[[0, 2, 7, 8]], [0, 1, 0, 0.5], atol=1e-5)
    assert not found.low_confidence.any()
    strict = discover_people(POINTS, GALLERY, ["bob", "ann"], 4, n_init=4, ratio=0.05, progress=False)
    assert strict.low_confidence[2] and strict.low_confidence[3] and not strict.low_confidence[0]


def test_k_checks():
    with pytest.raises(ValueError, match="at least 2 gallery people, found 1"):
        discover_people(POINTS, ["ann"] + [None] * 8, ["ann"], None, progress=False)
    with pytest.raises(ValueError, match="between the 2 gallery people and the 9 faces"):
        discover_people(POINTS, GALLERY, ["ann", "bob"], 10, progress=False)
    assert parse_k("auto") is None and parse_k("7") == 7
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_k("0")
