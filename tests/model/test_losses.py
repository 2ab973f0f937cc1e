"""GCD losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import gcd_loss, info_nce_loss, supcon_loss


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1).float()


# Two samples, two views each, 2-D features: rows [a1, b1, a2, b2].
Z = _unit([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, -0.8]])


def _dot(i, j):
    return sum(float(Z[i, k]) * float(Z[j, k]) for k in range(Z.shape[1]))


def _info_nce_by_hand(rows, temperature):
    n = len(rows) // 2
    total = 0.0
    for a, i in enumerate(rows):
        positive = rows[(a + n) % (2 * n)]
        denominator = sum(math.exp(_dot(i, j) / temperature) for j in rows if j != i)
        total += -math.log(math.exp(_dot(i, positive) / temperature) / denominator)
    return total / len(rows)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_info_nce_by_hand(temperature):
    expected = _info_nce_by_hand([0, 1, 2, 3], temperature)
    assert info_nce_loss(Z, temperature).item() == pytest.approx(expected, rel=1e-5)
    # unnormalised inputs are normalised first
    assert info_nce_loss(3.0 * Z, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_mask_restricts_samples():
    z = torch.cat([Z[:2], torch.randn(1, 2), Z[2:], torch.randn(1, 2)])  # third sample masked out
    mask = torch.tensor([True, True, False])
    assert info_nce_loss(z, 1.0, mask=mask).item() == pytest.approx(_info_nce_by_hand([0, 1, 2, 3], 1.0), rel=1e-5)
    with_one = info_nce_loss(Z, 1.0, mask=torch.tensor([True, False]))
    assert with_one.item() == pytest.approx(0.0, abs=1e-6)  # the positive is the only other row


def _supcon_by_hand(labels, temperature, base_temperature):
    rows = list(range(4))
    lab = labels + labels
    total = 0.0
    for a in rows:
        denominator = sum(math.exp(_dot(a, k) / temperature) for k in rows if k != a)
        positives = [p for p in rows if p != a and lab[p] == lab[a]]
        mean_log = sum(math.log(math.exp(_dot(a, p) / temperature) / denominator) for p in positives)
        total += -(temperature / base_temperature) * mean_log / len(positives)
    return total / len(rows)


@pytest.mark.parametrize("labels", [[0, 1], [2, 2]])
@pytest.mark.parametrize("temperature,base", [(0.07, 0.07), (0.5, 0.07)])
def test_supcon_by_hand(labels, temperature, base):
    expected = _supcon_by_hand(labels, temperature, base)
    assert supcon_loss(Z, torch.tensor(labels), temperature, base).item() == pytest.approx(expected, rel=1e-4)


def test_supcon_needs_two_views():
    with pytest.raises(ValueError, match="views"):
        supcon_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_gcd_loss_combines_and_skips_supcon_without_labels():
    z = Z.clone().requires_grad_(True)
    labels = torch.tensor([0, 1])
    out = gcd_loss(z, labels, torch.tensor([True, True]))
    expected = 0.65 * _info_nce_by_hand([0, 1, 2, 3], 1.0) + 0.35 * _supcon_by_hand([0, 1], 0.07, 0.07)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["has_labelled"].item() is True

    out = gcd_loss(z, labels, torch.tensor([False, False]))
    assert out["has_labelled"].item() is False and out["loss_sup"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.65 * _info_nce_by_hand([0, 1, 2, 3], 1.0), rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(z.grad).all()


def test_gcd_loss_is_float32_under_bfloat16_input():
    out = gcd_loss(Z.bfloat16(), torch.tensor([0, 1]), torch.tensor([True, False]), contrast_unlabel_only=True)
    assert out["loss"].dtype == torch.float32
    # only sample 1 is unlabelled: InfoNCE over its two views is 0, SupCon over sample 0 alone is finite
    assert out["loss_unsup"].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(out["loss"])


def test_gcd_loss_shape_errors():
    with pytest.raises(ValueError, match="2B rows"):
        gcd_loss(torch.randn(5, 3), torch.tensor([0, 1]), torch.tensor([True, False]))
