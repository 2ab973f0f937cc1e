"""utils.distributed helpers without a process group (tests/model/test_partial_fc.py runs them on 2 processes)."""

import pytest
import torch

from utils.distributed import all_gather_ints, contiguous_shard, gather_shards_to_primary


def test_contiguous_shards_cover_all_rows():
    parts = [contiguous_shard(10, r, 3) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]


def test_contiguous_shard_without_a_process_group_is_everything():
    assert contiguous_shard(7) == slice(0, 7)


def test_host_exchange_and_block_gather_without_a_process_group():
    assert all_gather_ints(7) == [7]
    rows = torch.arange(12.0).view(4, 3)
    out = gather_shards_to_primary(rows, 4, 2)
    assert torch.equal(out, rows) and out.data_ptr() != rows.data_ptr()  # a copy: the caller may keep it
    with pytest.raises(ValueError, match=r"rank 0 must pass its 5 rows of 5 .* shape \(4, 3\) and block_rows=2"):
        gather_shards_to_primary(rows, 5, 2)
    with pytest.raises(ValueError, match="block_rows >= 1; got .* block_rows=0"):
        gather_shards_to_primary(rows, 4, 0)
