"""utils.distributed helpers that need no process group."""

from utils.distributed import contiguous_shard


def test_contiguous_shards_cover_all_rows():
    parts = [contiguous_shard(10, r, 3) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]


def test_contiguous_shard_without_a_process_group_is_everything():
    assert contiguous_shard(7) == slice(0, 7)
