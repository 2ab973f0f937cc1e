"""DINO pretraining: loss and center by hand, schedules, EMA teacher, training steps, checkpoint export, 2 ranks.

Hand values follow DINO's formulas (facebookresearch/dino ``main_dino.py`` ``DINOLoss``, ``utils.cosine_scheduler``).
This file is also the torchrun worker of the distributed test (``python -m torch.distributed.run ... test_dino.py
OUT``): see ``_distributed_worker``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.models import model_entrypoint
from torch.utils.data import default_collate

from data_loader.multicrop import MultiCropTransform
from model.dino import DINOConfig, DINOMethod, DINOSchedules
from model.dino_loss import DINOLoss
from model.vit import create_backbone, load_pretrained_backbone
from utils.checkpoint import CheckpointError
from utils.distributed import cleanup, get_rank, init_distributed
from utils.schedules import cosine_schedule

LN2 = math.log(2.0)
A, B, C = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]


def tiny_config(**overrides) -> DINOConfig:
    """ViT-T/16 at 32 px (2 x 2 patches), a small head, 2 global + 2 local views."""
    values = dict(
        arch="vit_tiny", patch_size=16, img_size=32, out_dim=64, hidden_dim=128, bottleneck_dim=32, n_local=2, epochs=2
    )
    return DINOConfig(**(values | overrides))


def dynamic_backbone() -> nn.Module:
    """The registered ViT-T/16 at 32 px with timm's ``dynamic_img_size`` (16-px local views: one patch)."""
    return model_entrypoint("vit_tiny")(patch_size=16, img_size=32, dynamic_img_size=True)


def tiny_method(seed: int = 0, **overrides) -> DINOMethod:
    torch.manual_seed(seed)
    return DINOMethod(tiny_config(**overrides), backbone=dynamic_backbone())


def multicrop_batch(batch: int = 4, seed: int = 0, n_local: int = 2, **kwargs) -> list:
    """A collated loader batch ``(views, labels, uq_idx)`` of random RGB images through MultiCropTransform."""
    gen = np.random.default_rng(seed)
    transform = MultiCropTransform(32, 16, n_local, **kwargs)
    torch.manual_seed(seed)
    items = [
        (transform(Image.fromarray(gen.integers(0, 256, (40, 40, 3), dtype=np.uint8))), i % 2, i) for i in range(batch)
    ]
    return default_collate(items)


# ------------------------------------------------------------------------------------------------ loss
def test_dino_loss_and_center_by_hand():
    """out_dim 3, 2 global + 1 local view, batch 2; all probabilities are powers of 1/2.

    Teacher softmaxes q (after centring and sharpening): view 0 = (A, B), view 1 = (C, A) for images (b0, b1).
    Student softmaxes p: view 0 = (A, B), view 1 = (C, A), view 2 (local) = (B, A), with
    A = (1/2, 1/4, 1/4), B = (1/4, 1/2, 1/4), C = (1/4, 1/4, 1/2).
    -log2 A = (1, 2, 2) etc., so H(X, X) = 1.5 ln 2 and H(X, Y) = 1.75 ln 2 for X != Y among A, B, C.
    Pairs (teacher view, student view) with v != g: (0, 1): (A,C), (B,A) -> 1.75; (0, 2): (A,B), (B,A) -> 1.75;
    (1, 0): (C,A), (A,B) -> 1.75; (1, 2): (C,B), (A,A) -> (1.75 + 1.5) / 2 = 1.625.
    loss = (3 * 1.75 + 1.625) / 4 * ln 2 = 1.71875 ln 2.
    """
    loss_fn = DINOLoss(
        3,
        n_local=1,
        epochs=10,
        warmup_teacher_temp=0.07,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=4,
        student_temp=0.1,
        center_momentum=0.9,
    )
    tau_t = 0.07 + (0.04 - 0.07) * 2 / 3  # np.linspace(0.07, 0.04, 4)[2] = 0.05
    assert loss_fn.teacher_temp(2) == pytest.approx(0.05)
    center = torch.tensor([[0.3, -0.2, 0.1]])
    loss_fn.center.copy_(center)
    q = torch.tensor([A, B, C, A])  # view-major rows: (view 0: b0, b1), (view 1: b0, b1)
    p = torch.tensor([A, B, C, A, B, A])
    teacher_out = center + tau_t * q.log()  # softmax((t - center) / tau_t) = q
    student_out = 0.1 * p.log()  # log_softmax(s / 0.1) = log p
    loss = loss_fn(student_out, teacher_out, epoch=2)
    assert loss.item() == pytest.approx(1.71875 * LN2, rel=1e-5)

    # every teacher softmax has entropy 0.5 ln 2 + 2 * 0.25 * 2 ln 2 = 1.5 ln 2
    assert loss_fn.teacher_entropy.item() == pytest.approx(1.5 * LN2, rel=1e-5)
    # batch mean of the teacher rows = center + tau_t * mean(log q) = center + 0.05 * (-1.5, -1.75, -1.75) ln 2;
    # new center = 0.9 * center + 0.1 * batch mean = center + 0.005 * (-1.5, -1.75, -1.75) ln 2
    expected = torch.tensor([[0.3 - 0.0075 * LN2, -0.2 - 0.00875 * LN2, 0.1 - 0.00875 * LN2]])
    torch.testing.assert_close(loss_fn.center, expected, rtol=0, atol=1e-6)


def test_dino_loss_gradient_reaches_the_student_only():
    loss_fn = DINOLoss(5, n_local=2, epochs=1)
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss_fn(student, teacher, epoch=0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_teacher_temperature_schedule_lafs():
    """LAFS: np.linspace(0.07, 0.04, 30) for epochs 0-29, then 0.04 (step (0.04 - 0.07) / 29 per epoch)."""
    loss_fn = DINOLoss(
        4, n_local=8, epochs=41, warmup_teacher_temp=0.07, teacher_temp=0.04, warmup_teacher_temp_epochs=30
    )
    assert loss_fn.teacher_temp(0) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(15) == pytest.approx(0.07 - 0.03 * 15 / 29)  # 0.0544828
    assert loss_fn.teacher_temp(29) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(30) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(40) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(100) == pytest.approx(0.04)  # past the run: the final value
    constant = DINOLoss(4, n_local=8, epochs=5, warmup_teacher_temp=0.07, teacher_temp=0.04)
    assert [constant.teacher_temp(e) for e in range(5)] == [pytest.approx(0.04)] * 5


def test_dino_loss_rejects_bad_shapes_and_settings():
    loss_fn = DINOLoss(4, n_local=1, epochs=1)
    with pytest.raises(ValueError, match="student_out must be"):
        loss_fn(torch.zeros(4, 4), torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="teacher_out must be"):
        loss_fn(torch.zeros(6, 4), torch.zeros(6, 4), 0)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        DINOLoss(4, n_local=1, epochs=5, warmup_teacher_temp_epochs=6)
    with pytest.raises(ValueError, match="at least 2 views"):
        DINOLoss(4, n_local=0, epochs=5, n_global=1)


# ------------------------------------------------------------------------------------------------ schedules
def test_cosine_schedule_by_hand():
    """base 1, final 0, 3 epochs x 2 steps, 1 warm-up epoch from 0.2: warm-up linspace(0.2, 1, 2) = (0.2, 1);
    then 0.5 * (1 + cos(pi * i / 4)) for i = 0..3 = 1, 0.853553, 0.5, 0.146447."""
    values = cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=2, warmup_epochs=1, start_warmup=0.2)
    np.testing.assert_allclose(values, [0.2, 1.0, 1.0, 0.8535534, 0.5, 0.1464466], rtol=1e-6)
    # LAFS weight decay 0.04 -> 0.4 over 41 epochs of 100 steps: middle (i = 2050 of 4100) = 0.4 - 0.18 = 0.22
    wd = cosine_schedule(0.04, 0.4, 41, 100)
    assert len(wd) == 4100
    assert wd[0] == pytest.approx(0.04) and wd[2050] == pytest.approx(0.22)
    assert wd[-1] == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi * 4099 / 4100)))


def test_schedules_apply_sets_lr_and_decay_and_returns_the_momentum():
    """lr: warm-up linspace(0, 1e-3, 2) = (0, 1e-3), then 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + cos(pi * i / 2));
    momentum 0.996 -> 1 at i = 1 of 4: 1 + 0.5 * (0.996 - 1) * (1 + cos(pi / 4)) = 0.9965858."""
    schedules = DINOSchedules.build(lr=1e-3, min_lr=1e-6, epochs=2, steps_per_epoch=2, warmup_epochs=1)
    decay, no_decay = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW(
        [
            {"params": [decay], "weight_decay": 0.04, "name": "decay"},
            {"params": [no_decay], "weight_decay": 0.0, "name": "no_decay", "lr_scale": 0.5},
        ],
        lr=1.0,
    )
    momentum = schedules.apply(optimizer, 3)
    lr3 = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi / 2))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr3)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * lr3)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(
        0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(3 * math.pi / 4))
    )
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert momentum == pytest.approx(1 + 0.5 * (0.996 - 1) * (1 + math.cos(3 * math.pi / 4)))
    assert schedules.apply(optimizer, 1) == pytest.approx(0.9965858, abs=1e-7)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(IndexError, match="outside"):
        schedules.apply(optimizer, 4)


# ------------------------------------------------------------------------------------------------ the method
def test_update_teacher_is_the_ema_of_the_student():
    """One parameter by hand: teacher 3, student 1, momentum 0.9 -> 0.9 * 3 + 0.1 * 1 = 2.8; and every tensor."""
    method = tiny_method()
    with torch.no_grad():
        method.student.head.mlp[0].bias.fill_(1.0)
        method.teacher.head.mlp[0].bias.fill_(3.0)
        for p in method.student.backbone.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method.update_teacher(0.9)
    torch.testing.assert_close(method.teacher.head.mlp[0].bias, torch.full((128,), 2.8))
    student = method.student.state_dict()
    for name, value in method.teacher.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * student[name], msg=name)
    with pytest.raises(ValueError, match="momentum"):
        method.update_teacher(1.5)


def test_training_steps_lower_the_loss_and_move_the_teacher_by_ema_only():
    """ViT-T/16 at 32 px, out_dim 64, batch 4, 2 global (32 px) + 2 local (16 px) views from MultiCropTransform."""
    method = tiny_method()
    global_views, local_views = method.batch_inputs(multicrop_batch(), torch.device("cpu"))
    assert [v.shape for v in global_views] == [(4, 3, 32, 32)] * 2
    assert [v.shape for v in local_views] == [(4, 3, 16, 16)] * 2
    optimizer = torch.optim.AdamW(method.get_params_groups(0.04), lr=1e-3)
    last_layer = method.student.head.last_layer.weight_v
    losses = []
    for step in range(4):
        epoch = 0 if step < 2 else 1
        method.begin_epoch(epoch)
        teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
        last_before = last_layer.detach().clone()
        out = method(global_views, local_views)
        assert torch.isfinite(out["loss"]) and out["teacher_temp"] == pytest.approx(0.04)
        assert 0 < out["teacher_entropy"] <= math.log(64)
        losses.append(out["loss"].item())
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert all(p.grad is None for p in method.teacher.parameters())
        method.clip_gradients(3.0)
        method.cancel_last_layer_gradients(epoch)
        assert (last_layer.grad is None) == (epoch == 0)
        optimizer.step()
        assert torch.equal(last_layer, last_before) == (epoch == 0)  # frozen in the first epoch only
        for name, value in method.teacher.state_dict().items():  # backward and step leave the teacher alone
            assert torch.equal(value, teacher_before[name]), name
        method.update_teacher(0.99)
        student = method.student.state_dict()
        for name, value in method.teacher.state_dict().items():
            torch.testing.assert_close(value, 0.99 * teacher_before[name] + 0.01 * student[name], msg=name)
    assert losses[-1] < losses[0], losses


def test_optimizer_hooks_apply_the_schedules_freeze_the_last_layer_and_update_the_teacher():
    """2 epochs x 2 steps: lr warm-up linspace(0, 1e-3, 2); progress 0.5 is iteration 1 (epoch 0: last layer
    frozen), momentum[1] = 1 + 0.5 * (0.996 - 1) * (1 + cos(pi / 4)) = 0.9965858; progress 1.5 is iteration 3."""
    method = tiny_method()
    views = method.batch_inputs(multicrop_batch(batch=2), torch.device("cpu"))
    optimizer = torch.optim.AdamW(method.get_params_groups(0.04), lr=1.0)
    with pytest.raises(RuntimeError, match="use_schedules"):
        method.before_optimizer_step(optimizer, 0.0)
    method.use_schedules(DINOSchedules.build(lr=1e-3, min_lr=1e-6, epochs=2, steps_per_epoch=2, warmup_epochs=1))
    for progress, frozen in ((0.5, True), (1.5, False)):
        method.begin_epoch(int(progress))
        optimizer.zero_grad(set_to_none=True)
        method(*views)["loss"].backward()
        method.before_optimizer_step(optimizer, progress)
        assert (method.student.head.last_layer.weight_v.grad is None) == frozen
        teacher = {k: v.clone() for k, v in method.teacher.state_dict().items()}
        optimizer.step()
        method.after_optimizer_step(progress)
        it = round(progress * 2)
        momentum = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * it / 4))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 if it == 1 else 1e-6 + 0.5 * (1e-3 - 1e-6))
        assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi * it / 4)))
        assert optimizer.param_groups[1]["weight_decay"] == 0.0
        student = method.student.state_dict()
        for name, value in method.teacher.state_dict().items():
            torch.testing.assert_close(value, momentum * teacher[name] + (1 - momentum) * student[name], msg=name)
    with pytest.raises(IndexError, match="outside the schedules"):
        method.after_optimizer_step(2.0)


def test_shared_training_loop_runs_dino_through_its_hooks():
    """trainer.engine.train_one_epoch on 2 batches for 2 epochs: the head's last layer moves only in epoch 1, the
    teacher moves every epoch, the logged lr is the schedule's."""
    from trainer.engine import train_one_epoch
    from trainer.precision import Precision

    method = tiny_method()
    loader = [multicrop_batch(batch=2, seed=s) for s in range(2)]
    optimizer = torch.optim.AdamW(method.get_params_groups(0.04), lr=1.0)
    method.use_schedules(DINOSchedules.build(lr=1e-3, min_lr=1e-6, epochs=2, steps_per_epoch=2, warmup_epochs=1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(2):
        last_layer = method.student.head.last_layer.weight_v.detach().clone()
        teacher = method.teacher.backbone.pos_embed.detach().clone()
        stats = train_one_epoch(
            method,
            loader,
            optimizer,
            scaler,
            Precision("cpu", None, False),
            epoch=epoch,
            device=torch.device("cpu"),
            progress=False,
        )
        assert math.isfinite(stats["loss"]) and stats["teacher_temp"] == pytest.approx(0.04)
        assert torch.equal(method.student.head.last_layer.weight_v, last_layer) == (epoch == 0)
        assert not torch.equal(method.teacher.backbone.pos_embed, teacher)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # iteration 3


def test_front_end_sees_every_view_once_with_its_clean_crop():
    """A frozen front end gets (augmented, clean, global_view) per view; its output is the backbone input."""

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
            self.calls: list[tuple] = []

        def forward(self, image, clean, *, global_view):
            self.calls.append((tuple(image.shape), None if clean is None else tuple(clean.shape), global_view))
            return image if global_view else F.interpolate(image, size=(32, 32), mode="nearest")

    recorder = Recorder()
    torch.manual_seed(0)
    method = DINOMethod(tiny_config(), front_end=recorder)  # a fixed-size backbone: the front end gives 32 px
    views = method.batch_inputs(multicrop_batch(batch=2, split_photometric=True), torch.device("cpu"))
    out = method(*views)
    assert torch.isfinite(out["loss"])
    assert (
        recorder.calls == [((2, 3, 32, 32), (2, 3, 32, 32), True)] * 2 + [((2, 3, 16, 16), (2, 3, 16, 16), False)] * 2
    )
    recorder.calls.clear()
    method.eval()
    features = method.extract_features(torch.randn(3, 3, 32, 32))
    assert recorder.calls == [((3, 3, 32, 32), None, True)]
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="front end must be frozen"):
        DINOMethod(tiny_config(), front_end=nn.Linear(2, 2))


def test_params_groups_skip_biases_norms_and_the_teacher():
    method = tiny_method()
    groups = {g["name"]: g for g in method.get_params_groups(0.04)}
    assert groups["decay"]["weight_decay"] == 0.04 and groups["no_decay"]["weight_decay"] == 0.0
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    student = dict(method.student.named_parameters())
    assert id(student["backbone.blocks.0.norm1.weight"]) in no_decay_ids
    assert id(student["backbone.blocks.0.attn.qkv.bias"]) in no_decay_ids
    assert id(student["backbone.blocks.0.attn.qkv.weight"]) in decay_ids
    assert id(student["backbone.pos_embed"]) in decay_ids  # DINO decays the tokens too (ndim 3)
    assert id(student["head.last_layer.weight_v"]) in decay_ids
    assert id(student["head.last_layer.weight_g"]) not in decay_ids | no_decay_ids  # frozen (norm_last_layer)
    trainable = {id(p) for p in method.student.parameters() if p.requires_grad}
    assert decay_ids | no_decay_ids == trainable and not decay_ids & no_decay_ids


def test_clip_gradients_clips_each_parameter_on_its_own():
    """Gradient (3, 4) has norm 5: clip 1 -> (3, 4) / (5 + 1e-6); a gradient of norm 0.5 is left as it is."""
    method = tiny_method()
    big, small = method.student.head.mlp[4].bias, method.student.head.mlp[2].bias
    big.grad = torch.zeros_like(big)
    big.grad[:2] = torch.tensor([3.0, 4.0])
    small.grad = torch.zeros_like(small)
    small.grad[0] = 0.5
    method.clip_gradients(1.0)
    torch.testing.assert_close(big.grad[:2], torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))
    assert small.grad[0].item() == 0.5
    assert method.student.head.mlp[0].bias.grad is None


def test_dino_checkpoint_loads_with_load_pretrained_backbone(tmp_path):
    """The exported file has DINO's layout and loads teacher and student backbones into fixed-size ViTs."""
    method = tiny_method()
    with torch.no_grad():  # make the student differ from the teacher
        for p in method.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt = method.dino_checkpoint(epoch=3, args=argparse.Namespace(arch="vit_tiny", lr=5e-4, crops=(0.4, 1.0)))
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    stored = torch.load(path, weights_only=True)
    assert set(stored) == {"student", "teacher", "epoch", "args", "dino_loss"}
    assert stored["epoch"] == 3 and stored["args"] == {"arch": "vit_tiny", "lr": 5e-4, "crops": (0.4, 1.0)}
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in stored["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in stored["teacher"])
    assert "module.head.last_layer.weight_g" in stored["student"] and "head.mlp.0.weight" in stored["teacher"]
    assert stored["dino_loss"]["center"].shape == (1, 64)

    for key, source in (("teacher", method.teacher.backbone), ("student", method.student.backbone)):
        target = create_backbone("vit_tiny", patch_size=16, img_size=32)
        report = load_pretrained_backbone(target, path, checkpoint_key=key)
        assert all(k.startswith("head.") for k in report["ignored"]) and len(report["ignored"]) == 8
        expected = source.state_dict()
        for name, value in target.state_dict().items():
            assert torch.equal(value, expected[name]), (key, name)


def test_config_round_trip_names_unknown_fields():
    cfg = tiny_config(warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=1)
    stored = cfg.to_dict()
    assert stored["method"] == "dino" and DINOConfig.from_dict(stored) == cfg
    with pytest.raises(CheckpointError, match="unknown fields \\['depth'\\]"):
        DINOConfig.from_dict(stored | {"depth": 3})


def test_batch_inputs_rejects_a_wrong_number_of_views():
    method = tiny_method()
    with pytest.raises(ValueError, match="needs 4 views"):
        method.batch_inputs(multicrop_batch(batch=1, n_local=1), torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ two ranks
@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_two_ranks_share_center_teacher_and_student(tmp_path):
    """Rank 0 has 2 teacher rows (1 image), rank 1 has 4 (2 images): the center update uses the mean of all 6.

    Column sums: 1+3+0+2+4+6 = 16, 2+4+0+2+4+6 = 18, 3+5+0+2+4+6 = 20 -> mean (16/6, 3, 20/6); center
    0.9 * 0 + 0.1 * mean = (0.266667, 0.3, 0.333333). The methods start from different seeds and see different
    images; after 2 steps both ranks hold the same student, teacher and center.
    """
    from cli_helpers import run_torchrun_worker

    run_torchrun_worker(Path(__file__), [tmp_path], timeout=140)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        torch.testing.assert_close(result["center"], torch.tensor([[16 / 60, 0.3, 20 / 60]]))
    for part in ("student", "teacher", "method_center"):
        for name, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][name]), (part, name)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own images


def _distributed_worker(out_dir: str) -> None:
    device = init_distributed("cpu")
    rank = get_rank()
    loss_fn = DINOLoss(3, n_local=1, epochs=1)
    rows = [[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], [[0.0] * 3, [2.0] * 3, [4.0] * 3, [6.0] * 3]][rank]
    loss_fn.update_center(torch.tensor(rows))

    method = tiny_method(seed=10 + rank)
    method.prepare_for_distributed_training(device)
    optimizer = torch.optim.AdamW(method.get_params_groups(0.04), lr=1e-3)
    inputs = method.batch_inputs(multicrop_batch(batch=2, seed=rank), device)
    losses = []
    for _ in range(2):
        out = method(*inputs)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.update_teacher(0.9)
        losses.append(out["loss"].item())
    torch.save(
        {
            "center": loss_fn.center,
            "student": method.student.state_dict(),
            "teacher": method.teacher.state_dict(),
            "method_center": {"center": method.dino_loss.center},
            "losses": losses,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    cleanup()


if __name__ == "__main__":
    _distributed_worker(sys.argv[1])
