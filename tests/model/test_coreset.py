"""FaceCoresetNet's aggregator against values worked out by hand (model/coreset.py)."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.coreset import CoresetAggregator, norm_encoding, select_core
from utils.evaluation.ijb import pad_templates


def _angles(degrees: list[float]) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180.0
    return torch.stack([radians.cos(), radians.sin()], -1)[None]


def _core(units, norms, gamma, k) -> list[int]:
    rows, valid = select_core(units, torch.as_tensor(norms, dtype=units.dtype)[None], gamma, k)
    assert bool(valid.all())
    return rows[0].argmax(-1).tolist()


def test_farthest_point_core_of_four_directions():
    # first pick: the largest norm (30, item 1 at 10 deg); distances from it (1 - cos)/2: 0 deg 0.0076, 90 deg 0.413,
    # 180 deg 0.992 -> item 3; then min over the core: 0 deg min(0.0076, 1) , 90 deg min(0.413, 0.5) -> item 2
    units = _angles([0.0, 10.0, 90.0, 180.0])
    assert _core(units, [10.0, 30.0, 5.0, 5.0], 0.0, 3) == [1, 3, 2]
    assert _core(units, [10.0, 30.0, 5.0, 5.0], 0.01, 3) == [1, 3, 2]


def test_gamma_decides_between_distance_and_quality():
    # from the first pick (norm 10, 0 deg): a at 90 deg has (1 - cos)/2 = 0.5 and norm 1; b at acos(0.2) has 0.4 and
    # norm e. gamma = 0 compares 0.5 with 0.4 (a); gamma = 1 compares 0.5 with 0.4 e = 1.087 (b); the switch is at
    # gamma* = ln 1.25 = 0.223
    units = _angles([0.0, 90.0, math.degrees(math.acos(0.2))])
    norms = [10.0, 1.0, math.e]
    assert _core(units, norms, 0.0, 2) == [0, 1]
    assert _core(units, norms, 1.0, 2) == [0, 2]
    assert _core(units, norms, 0.2, 2) == [0, 1]
    assert _core(units, norms, 0.25, 2) == [0, 2]


def test_small_templates_give_every_item_once():
    units = _angles([0.0, 40.0])
    assert sorted(_core(units, [3.0, 4.0], 0.01, 3)) == [0, 1]
    assert _core(_angles([25.0]), [2.0], 0.01, 3) == [0]
    same = _angles([30.0, 30.0])  # exact duplicates: the second pick is not the first again
    assert sorted(_core(same, [2.0, 2.0], 0.01, 3)) == [0, 1]


def test_duplicates_do_not_enter_the_core_twice():
    generator = torch.Generator().manual_seed(0)
    distinct = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator, dtype=torch.float64), dim=1)
    cores = []
    for repeats in (2, 10):
        units = torch.cat([distinct[:1].expand(repeats, -1), distinct[1:]])[None]
        norms = [20.0] * repeats + [10.0, 5.0]
        picked = _core(units, norms, 0.01, 3)
        torch.testing.assert_close(units[0, picked], distinct)  # one copy of the repeated vector, then the two others
        cores.append(units[0, picked])
    torch.testing.assert_close(cores[0], cores[1])  # the core alone ignores the repeat count


def _model(dim: int = 64, core_size: int = 3) -> CoresetAggregator:
    torch.manual_seed(0)
    return CoresetAggregator(dim, core_size=core_size).eval()


def _template(n: int, dim: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=generator)
    norms = torch.linspace(5.0, 40.0, n)[torch.randperm(n, generator=generator)]
    return torch.nn.functional.normalize(feats, dim=1), norms


def test_output_is_permutation_invariant():
    model = _model()
    units, norms = _template(50)
    with torch.no_grad():
        unit, norm = model(units[None], norms[None])
        for seed in range(3):
            perm = torch.randperm(50, generator=torch.Generator().manual_seed(seed))
            unit_p, norm_p = model(units[perm][None], norms[perm][None])
            torch.testing.assert_close(unit_p, unit, rtol=0, atol=1e-5)
            torch.testing.assert_close(norm_p, norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(1))


def test_padded_batch_equals_one_template_at_a_time():
    model = _model()
    sizes = [1, 2, 5, 17]
    parts = [_template(n, seed=n) for n in sizes]
    embeddings = torch.cat([u * n[:, None] for u, n in parts])
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    shuffle = torch.randperm(len(owner), generator=torch.Generator().manual_seed(0))
    units, norms, mask = pad_templates(embeddings[shuffle], owner[shuffle], len(sizes))
    assert units.shape == (4, 17, 64) and mask.sum(1).tolist() == sizes
    with torch.no_grad():
        batch_unit, batch_norm = model(units, norms, mask)
        for i, (u, n) in enumerate(parts):
            unit, norm = model(u[None], n[None])
            torch.testing.assert_close(batch_unit[i : i + 1], unit, rtol=0, atol=1e-5)
            torch.testing.assert_close(batch_norm[i : i + 1], norm, rtol=1e-5, atol=1e-5)


def test_returned_norm_is_the_norm_of_the_mean_core_output():
    model = _model()
    units, norms = _template(8)
    with torch.no_grad():
        unit, norm = model(units[None], norms[None])
    assert norm.shape == (1, 1) and float(norm) > 0
    torch.testing.assert_close((unit * norm).norm(dim=-1, keepdim=True), norm)


def test_gamma_gets_a_gradient_through_the_straight_through_picks():
    model = _model().train()
    units, norms = _template(10)
    torch.manual_seed(3)
    unit, norm = model(units[None], norms[None])
    (unit.sum() + norm.sum()).backward()
    assert model.gamma.grad is not None and float(model.gamma.grad.abs()) > 0
    # in eval mode the picks are an exact argmax: no gradient reaches gamma
    model.zero_grad()
    model.eval()
    unit, norm = model(units[None], norms[None])
    (unit.sum() + norm.sum()).backward()
    assert model.gamma.grad is None or float(model.gamma.grad.abs()) == 0.0


def test_norm_encoding_values():
    zero = norm_encoding(torch.tensor([0.0]), 512)[0]
    torch.testing.assert_close(zero[0::2], torch.zeros(256))
    torch.testing.assert_close(zero[1::2], torch.ones(256))
    quarter = norm_encoding(torch.tensor([0.25]), 512)[0]
    # 2 pi 0.25 = pi / 2; the next frequency divides by 10000^(2/512) = 1.03663: sin(1.51529) = 0.99846
    torch.testing.assert_close(quarter[:2], torch.tensor([1.0, 0.0]), rtol=0, atol=1e-6)
    assert float(quarter[2]) == pytest.approx(0.99846, abs=1e-5)


def _flops(model: CoresetAggregator, n: int) -> int:
    units, norms = _template(n)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(units[None], norms[None])
    return counter.get_total_flops()


def test_cost_is_linear_in_the_template_size():
    model = _model()
    ratio = _flops(model, 8000) / _flops(model, 1000)
    assert 7.0 < ratio <= 8.0, ratio  # an N x N tensor would make it about 64


def test_empty_template_is_an_error():
    with pytest.raises(ValueError, match="empty template"):
        select_core(torch.zeros(1, 3, 4), torch.ones(1, 3), 0.0, 3, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="template 1 has no image"):
        pad_templates(torch.ones(2, 4), torch.tensor([0, 2]), 3)
