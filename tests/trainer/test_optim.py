"""Tests for trainer/optim.py: optimiser construction, lr scaling rule, cosine and step schedule values (docs/method.md,
section 7)."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn

from trainer.optim import (
    CosineWarmupScheduler,
    PolyWarmupScheduler,
    StepWarmupScheduler,
    create_optimizer,
    create_scheduler,
    resolve_lr,
)


def _groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_sgd_is_nesterov_with_decay_only_on_matrices():
    model = _model()
    optimizer = create_optimizer(_groups(model, 2e-5), opt="sgd", lr=0.1)
    assert isinstance(optimizer, torch.optim.SGD)
    decay, no_decay = optimizer.param_groups
    assert decay["nesterov"] and decay["momentum"] == 0.9 and decay["weight_decay"] == 2e-5
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 4

    # A step with zero gradients leaves 1-D parameters untouched and shrinks the decayed ones.
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) == (p.ndim == 1)


def test_momentum_adamw_and_unknown_names():
    model = _model()
    assert not create_optimizer(_groups(model, 1e-4), opt="momentum", lr=0.1).param_groups[0]["nesterov"]
    adamw = create_optimizer(_groups(model, 0.05), opt="AdamW", lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match=r"'lamb'.*sgd, nesterov, momentum, adamw"):
        create_optimizer(_groups(model, 1e-4), opt="lamb", lr=0.1)


def test_optimizer_rejects_frozen_and_empty_parameters():
    model = _model()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require gradients"):
        create_optimizer(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        create_optimizer([{"params": []}], lr=0.1)


def test_resolve_lr_rules():
    assert resolve_lr(0.05, 0.1, 256, "sgd") == 0.05
    assert resolve_lr(None, 0.1, 2 * 128, "sgd") == pytest.approx(0.1)
    assert resolve_lr(None, 0.1, 128, "sgd") == pytest.approx(0.05)
    assert resolve_lr(None, 1e-3, 1024, "adamw") == pytest.approx(2e-3)  # sqrt(1024 / 256)
    assert resolve_lr(None, 1e-3, 1024, "adamw", lr_base_scale="linear") == pytest.approx(4e-3)
    assert resolve_lr(None, 5e-4, 64, "adamw", lr_base_scale="linear") == pytest.approx(1.25e-4)  # DINO at batch 64
    assert resolve_lr(None, 0.1, 64, "sgd", lr_base_scale="sqrt") == pytest.approx(0.05)
    assert resolve_lr(None, 0.1, 4096, "sgd", lr_base_scale="none") == 0.1  # arcface_torch: lr is absolute
    with pytest.raises(ValueError, match="scaling rule"):
        resolve_lr(None, 0.1, 256, "sgd", lr_base_scale="cubic")


def test_schedule_matches_spec_values():
    optimizer = create_optimizer(_groups(_model(), 2e-5), lr=0.1)
    scheduler = CosineWarmupScheduler(optimizer, base_lr=0.1, epochs=100, warmup_epochs=5, warmup_lr=1e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # the constructor applies epoch 0
    expected = {0: 1e-5, 1: 0.020008, 4: 0.080002, 5: 0.099384, 50: 0.05, 99: 2.5e-5}
    for epoch, lr in expected.items():
        assert scheduler.lr_at(epoch) == pytest.approx(lr, rel=2e-2 if epoch == 99 else 1e-4), epoch
    assert scheduler.lr_at(99) == pytest.approx(2.4672e-5, rel=1e-3)
    assert scheduler.lr_at(100) == 0.0
    lrs = [scheduler.lr_at(t) for t in range(5, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))

    scheduler.step(50)
    assert scheduler.get_last_lr() == pytest.approx([0.05, 0.05])


def test_schedule_state_dict_round_trip_and_group_scale():
    model = _model()
    groups = _groups(model, 2e-5)
    groups[1]["lr_scale"] = 0.5
    optimizer = create_optimizer(groups, lr=0.1)
    scheduler = CosineWarmupScheduler(optimizer, base_lr=0.1, epochs=100, min_lr=1e-6)
    scheduler.step(30)
    state = scheduler.state_dict()

    optimizer2 = create_optimizer(groups, lr=0.1)
    resumed = CosineWarmupScheduler(optimizer2, base_lr=0.1, epochs=100, min_lr=1e-6)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 30
    assert resumed.get_last_lr() == pytest.approx([scheduler.lr_at(30), 0.5 * scheduler.lr_at(30)])
    assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_schedule_rejects_bad_settings():
    optimizer = create_optimizer(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="warmup-epochs"):
        CosineWarmupScheduler(optimizer, base_lr=0.1, epochs=3, warmup_epochs=5)
    with pytest.raises(ValueError, match="epochs"):
        CosineWarmupScheduler(optimizer, base_lr=0.1, epochs=0)


GB_COSFACE = dict(base_lr=0.1, epochs=24, milestones=(5, 10, 15, 20), decay_rate=0.1)


def test_step_schedule_gb_cosface_recipe_without_warmup():
    optimizer = create_optimizer(_groups(_model(), 5e-4), opt="momentum", lr=0.1, weight_decay=5e-4)
    scheduler = StepWarmupScheduler(optimizer, warmup_epochs=0, **GB_COSFACE)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the constructor applies epoch 0
    # 0.1 · 0.1^k, k = milestones <= epoch: epochs 0-4 -> 0.1, 5-9 -> 0.01, 10-14 -> 1e-3, 15-19 -> 1e-4, 20-23 -> 1e-5
    expected = [0.1] * 5 + [0.01] * 5 + [1e-3] * 5 + [1e-4] * 5 + [1e-5] * 4
    assert [scheduler.step(t) for t in range(24)] == pytest.approx(expected, rel=1e-12)
    assert scheduler.get_last_lr() == pytest.approx([1e-5, 1e-5])


def test_step_schedule_gb_cosface_recipe_with_warmup_and_floor():
    optimizer = create_optimizer(_model().parameters(), lr=0.1)
    scheduler = StepWarmupScheduler(optimizer, warmup_epochs=4, warmup_lr=0.02, **GB_COSFACE)
    # warm-up: 0.02 + t · (0.1 - 0.02) / 4 = 0.02, 0.04, 0.06, 0.08 for t = 0..3; epoch 4 is at base_lr
    expected = [0.02, 0.04, 0.06, 0.08, 0.1] + [0.01] * 5 + [1e-3] * 5 + [1e-4] * 5 + [1e-5] * 4
    assert [scheduler.lr_at(t) for t in range(24)] == pytest.approx(expected, rel=1e-12)
    # min_lr floors the decay: max(5e-4, 0.1 · 0.1^k) -> 0.1, 0.01, 1e-3, then 5e-4 from epoch 15
    floored = StepWarmupScheduler(optimizer, warmup_epochs=0, min_lr=5e-4, **GB_COSFACE)
    assert [floored.lr_at(t) for t in (4, 5, 10, 15, 23)] == pytest.approx([0.1, 0.01, 1e-3, 5e-4, 5e-4])


def test_step_schedule_state_round_trip_resumes_exactly(caplog):
    groups = _groups(_model(), 5e-4)
    groups[1]["lr_scale"] = 0.5
    optimizer = create_optimizer(groups, lr=0.1)
    scheduler = StepWarmupScheduler(optimizer, warmup_epochs=2, **GB_COSFACE)
    uninterrupted = [scheduler.step(t) for t in range(24)]
    scheduler.step(12)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain types only
    assert state["milestones"] == [5, 10, 15, 20] and state["decay_rate"] == 0.1 and state["last_epoch"] == 12

    resumed = StepWarmupScheduler(create_optimizer(groups, lr=0.1), warmup_epochs=2, **GB_COSFACE)
    with caplog.at_level(logging.WARNING, logger="trainer.optim"):
        resumed.load_state_dict(state)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert resumed.last_epoch == 12 and resumed.get_last_lr() == pytest.approx([1e-3, 5e-4])
    assert [resumed.step(t) for t in range(12, 24)] == uninterrupted[12:]

    # Changed milestones on the command line win, with a warning naming them.
    changed = StepWarmupScheduler(create_optimizer(groups, lr=0.1), base_lr=0.1, epochs=24, milestones=(8, 16))
    with caplog.at_level(logging.WARNING, logger="trainer.optim"):
        changed.load_state_dict(state)
    assert "milestones [5, 10, 15, 20] -> [8, 16]" in caplog.text
    assert changed.get_last_lr()[0] == pytest.approx(0.01)  # epoch 12 under (8, 16): one decay


@pytest.mark.parametrize(
    "milestones,match",
    [
        ((10, 5), r"--decay-milestones must be strictly increasing, got \[10, 5\]"),
        ((5, 5), r"--decay-milestones must be strictly increasing"),
        ((5, 24), r"--decay-milestones must lie in \[--warmup-epochs=0, --epochs=24\), got \[24\]"),
        ((-1, 5), r"--decay-milestones must lie in .*got \[-1\]"),
        ((2.5,), r"--decay-milestones must be whole epochs"),
    ],
)
def test_step_schedule_rejects_bad_milestones(milestones, match):
    optimizer = create_optimizer(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        StepWarmupScheduler(optimizer, base_lr=0.1, epochs=24, milestones=milestones, warmup_epochs=0)


def test_step_schedule_rejects_milestones_inside_warmup_and_bad_decay_rate():
    optimizer = create_optimizer(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"--decay-milestones must lie in \[--warmup-epochs=5, --epochs=24\).*\[3\]"):
        StepWarmupScheduler(optimizer, base_lr=0.1, epochs=24, milestones=(3, 10), warmup_epochs=5)
    for rate in (0.0, 1.5):
        with pytest.raises(ValueError, match="--decay-rate"):
            StepWarmupScheduler(optimizer, base_lr=0.1, epochs=24, milestones=(5,), decay_rate=rate, warmup_epochs=0)


def test_create_scheduler_by_name(caplog):
    optimizer = create_optimizer(_model().parameters(), lr=0.1)
    common = dict(base_lr=0.1, epochs=24, warmup_epochs=0, warmup_lr=1e-5, min_lr=0.0)
    step = create_scheduler("Step", optimizer, milestones=(5, 10, 15, 20), decay_rate=0.1, **common)
    assert isinstance(step, StepWarmupScheduler) and step.lr_at(10) == pytest.approx(1e-3)
    cosine = create_scheduler("cosine", optimizer, **common)
    assert isinstance(cosine, CosineWarmupScheduler)
    assert cosine.lr_at(12) == pytest.approx(0.05)  # 0.5 · 0.1 · (1 + cos(π · 12 / 24)) = 0.05
    with caplog.at_level(logging.WARNING, logger="trainer.optim"):
        create_scheduler("cosine", optimizer, milestones=(5,), **common)
    assert "do not apply to the cosine schedule" in caplog.text
    poly = create_scheduler("poly", optimizer, **common)
    assert isinstance(poly, PolyWarmupScheduler) and poly.lr_at(12) == pytest.approx(0.025)  # 0.1 · (1 − 12/24)²
    with pytest.raises(ValueError, match=r"'linear'.*supported: cosine, step, poly"):
        create_scheduler("linear", optimizer, **common)


def test_poly_schedule_is_transface_release_recipe():
    # TransFace MS1MV2: lr 1e-3, 35 epochs, 3 warm-up from 0, then 1e-3 · (1 − (t − 3) / 32)², t in epochs
    optimizer = create_optimizer(_model().parameters(), lr=1e-3)
    poly = PolyWarmupScheduler(optimizer, base_lr=1e-3, epochs=35, warmup_epochs=3, warmup_lr=0.0)
    assert optimizer.param_groups[0]["lr"] == 0.0  # the constructor applies epoch 0
    expected = {1.5: 5e-4, 3: 1e-3, 19: 2.5e-4, 27: 6.25e-5, 34: 9.765625e-7, 35: 0.0, 40: 0.0}
    for epoch, lr in expected.items():
        assert poly.lr_at(epoch) == pytest.approx(lr, abs=1e-15), epoch
    floor = PolyWarmupScheduler(optimizer, base_lr=1e-3, epochs=35, warmup_epochs=3, warmup_lr=0.0, min_lr=1e-5)
    assert floor.lr_at(19) == pytest.approx(1e-5 + 0.99e-3 * 0.25)
    poly.step(19)
    assert poly.get_last_lr() == pytest.approx([2.5e-4])
