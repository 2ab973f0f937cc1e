"""Tests for trainer/engine.py train_one_epoch: gradient accumulation over an epoch whose length is not a multiple
of --grad-accum-steps, on a real tiny FaceGCD (ViT-T/16 at 32 px) and a real DataLoader; the epoch statistics and the
NaN guard on a method whose scalars are known per batch; on CUDA, host synchronisations only at the check steps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from model.facegcd import FaceGCD, ModelConfig, build_facegcd
from model.meta_arch import MetaArch
from trainer.engine import NonFiniteLossError, train_one_epoch
from trainer.optim import CosineWarmupScheduler, PolyWarmupScheduler
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


class _KnownScalars(MetaArch):
    """A method whose scalars are plain functions of its batch x: loss = mean(x) (plus 0 x w, so it has a gradient),
    peak = max(x), and the counted ``negative_batches`` = 1 when some x < 0."""

    counted_scalars = ("negative_batches",)

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def batch_inputs(self, batch, device: torch.device) -> tuple[torch.Tensor]:
        return (batch[0].to(device, non_blocking=True),)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": x.mean() + 0.0 * self.w, "peak": x.max(), "negative_batches": (x < 0).any().float()}


# five batches of two; every value and mean below is exact in float32 and float64
_KNOWN_BATCHES = [[1.0, 2.0], [4.0, 6.0], [0.5, 0.25], [-1.0, 0.0], [-2.0, 6.0]]


def _known_setup(batches: list[list[float]], device: torch.device = torch.device("cpu")):
    """``_KnownScalars`` on ``device``, SGD at lr 0.5 whose steps are counted, and a loader over ``batches``."""
    model = _KnownScalars().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps: list[int] = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    loader = DataLoader(TensorDataset(torch.tensor(batches).flatten()), batch_size=2, pin_memory=device.type == "cuda")
    return model, optimizer, loader, steps


def _known_epoch(
    model, optimizer, loader, log_interval: int = 50, device: torch.device = torch.device("cpu"), scheduler=None
):
    """Epoch 3 of a ``_known_setup``; returns its statistics."""
    return train_one_epoch(
        model,
        loader,
        optimizer,
        FP32.grad_scaler(),
        FP32,
        epoch=3,
        device=device,
        log_interval=log_interval,
        progress=False,
        scheduler=scheduler,
    )


@pytest.mark.parametrize("log_interval", [1, 2, 50])  # scalars read every step, at steps 0, 2, 4, at steps 0 and 4
def test_epoch_statistics_are_the_means_of_the_batch_scalars_and_the_sums_of_the_counted_ones(log_interval):
    model, optimizer, loader, steps = _known_setup(_KNOWN_BATCHES)
    stats = _known_epoch(model, optimizer, loader, log_interval)
    assert len(steps) == 5
    # by hand from _KNOWN_BATCHES: batch means 1.5, 5, 0.375, -0.5, 2; maxima 2, 6, 0.5, 0, 6; batches 3 and 4 negative
    assert stats == {
        "lr": 0.5,
        "loss": (1.5 + 5.0 + 0.375 - 0.5 + 2.0) / 5,
        "peak": (2.0 + 6.0 + 0.5 + 0.0 + 6.0) / 5,
        "negative_batches": 2.0,
    }


@pytest.mark.parametrize(
    "log_interval, steps_taken",
    [(2, 4), (1, 3)],  # read at step 4 (the last), after four updates; read at step 3 itself, before its update
)
def test_a_non_finite_loss_stops_the_epoch_naming_its_first_step(log_interval, steps_taken):
    batches = [list(b) for b in _KNOWN_BATCHES]
    batches[3][0] = float("nan")  # steps 3 and 4 ...
    batches[4][1] = float("inf")  # ... are non-finite; step 3 is the first
    model, optimizer, loader, steps = _known_setup(batches)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at epoch 3, step 3;"):
        _known_epoch(model, optimizer, loader, log_interval)
    assert len(steps) == steps_taken


def _nan_on_one_rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = [list(b) for b in _KNOWN_BATCHES]
        if rank == 1:
            batches[1][1] = float("nan")  # only rank 1 sees a non-finite loss, at step 1
        try:
            _known_epoch(*_known_setup(batches)[:3], log_interval=3)
            message = "no error"
        except NonFiniteLossError as err:
            message = str(err)
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_every_rank_stops_when_one_rank_has_a_non_finite_loss(tmp_path):
    """The ranks agree at the check (step 3): both stop, naming rank 1's step, instead of one waiting on the other."""
    torch.multiprocessing.spawn(_nan_on_one_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert "non-finite training loss at epoch 3, step 1;" in (tmp_path / f"rank{rank}.txt").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations exist on CUDA only")
def test_on_cuda_the_step_synchronises_only_at_the_check_steps():
    """CUDA's sync debug mode warns at every operation that waits for the device. With 5 steps and log_interval 4,
    only steps 0 and 4 (the last) read it, twice each: the NaN check's ``item()`` and the log line's one copy of all
    pending scalars. The epoch's statistics need no further read: the last log line has read everything."""
    device = torch.device("cuda")
    model, optimizer, loader, steps = _known_setup(_KNOWN_BATCHES, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = _known_epoch(model, optimizer, loader, log_interval=4, device=device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(steps) == 5 and stats["negative_batches"] == 2.0
    assert len(syncs) == 4, syncs


def test_the_headline_of_a_pair_set_is_its_accuracy_and_of_an_ijb_set_its_tar_at_far_1e4():
    from trainer.engine import headline_score

    assert headline_score({"accuracy": 0.87, "accuracy_std": 0.03, "val": 0.14}) == 0.87
    assert headline_score({"auc": 0.98, "tar@1e-4": 0.05, "tar@1e-3": 0.35}) == 0.05


def test_a_per_iteration_schedule_sets_the_lr_before_every_optimiser_step_and_a_per_epoch_one_does_not():
    model, optimizer, loader, _ = _known_setup(_KNOWN_BATCHES)
    seen: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    poly = PolyWarmupScheduler(optimizer, base_lr=1.0, epochs=5, warmup_epochs=1, warmup_lr=0.0, min_lr=0.0)
    poly.step(3)
    _known_epoch(model, optimizer, loader, scheduler=poly)
    # by hand: t = 3 + k / 5 for the 5 steps; lr = (1 - (t - 1) / (5 - 1))^2 = 0.5^2, 0.45^2, 0.4^2, 0.35^2, 0.3^2
    assert seen == pytest.approx([0.25, 0.2025, 0.16, 0.1225, 0.09], abs=1e-12)
    assert poly.last_epoch == 3

    seen.clear()
    cosine = CosineWarmupScheduler(optimizer, base_lr=1.0, epochs=5, warmup_epochs=0, warmup_lr=0.0, min_lr=0.0)
    lr = cosine.step(3)
    _known_epoch(model, optimizer, loader, scheduler=cosine)
    assert seen == [lr] * 5
