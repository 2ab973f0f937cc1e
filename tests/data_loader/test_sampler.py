"""Balanced sampler: labelled share, one global stream split over ranks, epochs, resume and reference mode."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from data_loader.sampler import BalancedSampler


def _flags(n_labelled: int, n_unlabelled: int) -> torch.Tensor:
    return torch.cat([torch.ones(n_labelled, dtype=torch.bool), torch.zeros(n_unlabelled, dtype=torch.bool)])


def test_half_of_the_draws_are_labelled():
    flags = _flags(100, 900)
    sampler = BalancedSampler(flags, seed=3, num_replicas=1, rank=0)
    draws = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        draws.extend(sampler)
    assert len(draws) == 20 * 1000
    share = flags[torch.tensor(draws)].float().mean().item()
    assert abs(share - 0.5) < 0.02
    # draws are with replacement: every unlabelled item shows up, labelled ones repeat
    assert len(set(draws)) > 900


def test_ranks_partition_one_global_stream():
    flags = _flags(301, 700)  # 1001 items: odd, so one draw is dropped
    global_stream = list(BalancedSampler(flags, seed=7, num_replicas=1, rank=0))
    shards = [list(BalancedSampler(flags, seed=7, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 500
    assert shards[0] == global_stream[0:1000:2]
    assert shards[1] == global_stream[1:1000:2]


def test_epochs_differ_and_are_reproducible():
    flags = _flags(50, 150)
    a = BalancedSampler(flags, seed=1, num_replicas=2, rank=1)
    b = BalancedSampler(flags, seed=1, num_replicas=2, rank=1)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    b.set_epoch(1)
    assert list(b) == second
    assert list(BalancedSampler(flags, seed=2, num_replicas=2, rank=1)) != first


def test_state_dict_resumes_the_same_epoch():
    flags = _flags(20, 80)
    sampler = BalancedSampler(flags, seed=5, num_replicas=1, rank=0)
    sampler.set_epoch(4)
    state = sampler.state_dict()
    resumed = BalancedSampler(flags, seed=0, num_replicas=1, rank=0)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.seed) == (4, 5)
    assert list(resumed) == list(sampler)


def test_reference_mode_draws_a_full_epoch_per_rank_seeded_with_seed_plus_rank():
    flags = _flags(30, 70)
    rank0 = BalancedSampler(flags, seed=10, num_replicas=2, rank=0, mode="reference")
    rank1 = BalancedSampler(flags, seed=10, num_replicas=2, rank=1, mode="reference")
    assert len(rank0) == len(rank1) == 100
    assert list(rank0) != list(rank1)
    assert list(rank1) == list(BalancedSampler(flags, seed=11, num_replicas=2, rank=0, mode="reference"))


def test_drives_a_dataloader_with_drop_last():
    flags = _flags(10, 31)
    dataset = TensorDataset(torch.arange(41))
    sampler = BalancedSampler(flags, seed=0, num_replicas=2, rank=0)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True)
    batches = [batch[0] for batch in loader]
    assert len(batches) == 20 // 4
    assert torch.cat(batches).tolist() == list(sampler)[:20]


def test_bad_arguments_are_rejected():
    flags = _flags(2, 2)
    with pytest.raises(ValueError, match="mode"):
        BalancedSampler(flags, mode="weighted")
    with pytest.raises(ValueError, match="rank 2"):
        BalancedSampler(flags, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-empty"):
        BalancedSampler([], num_replicas=1, rank=0)
