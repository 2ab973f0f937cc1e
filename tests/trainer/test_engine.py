"""Tests for trainer/engine.py train_one_epoch: gradient accumulation over an epoch whose length is not a multiple
of --grad-accum-steps, on a real tiny FaceGCD (ViT-T/16 at 32 px) and a real DataLoader."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from model.facegcd import FaceGCD, ModelConfig, build_facegcd
from trainer.engine import train_one_epoch
from trainer.precision import Precision

IMG = 32
BATCH = 4
NUM_BATCHES = 5
ACCUM = 3  # groups of 3 + 2 micro-batches: the second one is the short last group
LR = 0.05
FP32 = Precision("cpu", None, False)


class _TwoViewSet(Dataset):
    """Fixed random two-view samples ``([view1, view2], label, uq_idx, is_labelled)``, half of them labelled."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.views = torch.randn(n, 2, 3, IMG, IMG, generator=gen)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return [self.views[i, 0], self.views[i, 1]], self.labels[i], i, i % 2 == 0


@pytest.fixture(scope="module")
def base_model() -> FaceGCD:
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="vit_tiny", patch_size=16, img_size=IMG, prefix_length=2, head_out_dim=128, grad_from_block=0
    )
    return build_facegcd(cfg)


def _loader(dataset: Dataset, first: int, count: int) -> DataLoader:
    return DataLoader(Subset(dataset, range(first * BATCH, (first + count) * BATCH)), batch_size=BATCH)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _run_epoch(model: torch.nn.Module, loader: DataLoader, params: list[torch.nn.Parameter]) -> int:
    """One seeded epoch with plain SGD (update = -LR * gradient); returns the number of optimiser steps."""
    optimizer = torch.optim.SGD(params, lr=LR)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    torch.manual_seed(7)
    train_one_epoch(
        model,
        loader,
        optimizer,
        FP32.grad_scaler(),
        FP32,
        epoch=0,
        device=torch.device("cpu"),
        grad_accum_steps=ACCUM,
        progress=False,
    )
    return len(steps)


def test_short_last_group_steps_on_the_mean_gradient_of_its_micro_batches(base_model):
    dataset = _TwoViewSet(NUM_BATCHES * BATCH)

    # the first, full group alone: the parameters and RNG state right before the short group
    before = copy.deepcopy(base_model)
    assert _run_epoch(before, _loader(dataset, 0, ACCUM), _trainable(before)) == 1
    rng_before_tail = torch.get_rng_state()

    # the mean gradient of the short group's two micro-batches, computed directly at those parameters
    reference = copy.deepcopy(before)
    tail = list(_loader(dataset, ACCUM, NUM_BATCHES - ACCUM))
    torch.set_rng_state(rng_before_tail)
    reference.train()
    for views, labels, _, labelled in tail:
        loss = reference(torch.cat(views), labels, labelled.bool())["loss"]
        (loss / len(tail)).backward()
    expected = [p.detach() - LR * r.grad for p, r in zip(_trainable(before), _trainable(reference))]
    assert max(float((LR * r.grad).abs().max()) for r in _trainable(reference)) > 1e-3  # well above the tolerance

    # the whole epoch: one full group, then the short one must take its own step
    model = copy.deepcopy(base_model)
    params = _trainable(model)
    assert _run_epoch(model, _loader(dataset, 0, NUM_BATCHES), params) == 2
    assert all(p.grad is None for p in params), "gradients left over after the epoch's last step"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, p_after, p_expected in zip(names, params, expected):
        torch.testing.assert_close(p_after.detach(), p_expected, msg=name)


def test_ddp_synchronises_on_the_last_micro_batch_of_every_group(base_model, tmp_path):
    """DDP (gloo, one process) all-reduces only on each group's last micro-batch, the epoch's last one included."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        inner = copy.deepcopy(base_model)
        forwards = []
        inner.register_forward_pre_hook(lambda *_: forwards.append(len(forwards)))
        model = DistributedDataParallel(inner)
        synced_at: set[int] = set()

        def recording_allreduce(state, bucket):
            synced_at.add(forwards[-1])
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])

        model.register_comm_hook(None, recording_allreduce)
        steps = _run_epoch(model, _loader(_TwoViewSet(NUM_BATCHES * BATCH), 0, NUM_BATCHES), _trainable(inner))
    finally:
        dist.destroy_process_group()
    assert steps == 2
    assert synced_at == {ACCUM - 1, NUM_BATCHES - 1}


def test_loader_shorter_than_its_length_is_an_error(base_model):
    class _Shorter(DataLoader):
        def __len__(self) -> int:
            return NUM_BATCHES

    model = copy.deepcopy(base_model)
    loader = _Shorter(Subset(_TwoViewSet(4 * BATCH), range(4 * BATCH)), batch_size=BATCH)
    with pytest.raises(RuntimeError, match="yielded 4 batches but its len\\(\\) is 5"):
        _run_epoch(model, loader, _trainable(model))
