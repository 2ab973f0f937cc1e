"""Tests for utils/schedules.py: the formulas that trainer/optim.py's per-epoch schedules and DINO's arrays share.

``cosine_schedule`` is checked by hand in tests/model/test_dino.py, the schedulers in tests/trainer/test_optim.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from utils.schedules import cosine_decay, linear_warmup, step_decay


def test_a_float_gives_a_float_and_an_array_the_same_values():
    """The per-epoch path (floats) and the per-iteration path (arrays) evaluate one formula."""
    t = np.arange(11)
    warmup = linear_warmup(t, 1e-5, 0.1, 10)
    assert warmup.tolist() == [linear_warmup(float(i), 1e-5, 0.1, 10) for i in t]
    cosine = [cosine_decay(float(i), 0.1, 1e-6, 10) for i in t]
    assert all(type(v) is float for v in cosine)
    np.testing.assert_allclose(cosine_decay(t, 0.1, 1e-6, 10), cosine, rtol=1e-15, atol=0)
    assert cosine[0] == 0.1 and cosine[5] == pytest.approx(0.5 * (0.1 + 1e-6)) and cosine[10] == pytest.approx(1e-6)
    assert linear_warmup(4.0, 1e-5, 0.1, 10) == pytest.approx(1e-5 + 0.4 * (0.1 - 1e-5))


def test_step_decay_counts_the_milestones_reached_and_stops_at_the_floor():
    values = [step_decay(t, 0.1, (5, 10), 0.1) for t in (4, 5, 9, 10, 20)]
    assert values == pytest.approx([0.1, 0.01, 0.01, 1e-3, 1e-3])
    assert step_decay(10, 0.1, (5, 10), 0.1, floor=5e-3) == 5e-3
