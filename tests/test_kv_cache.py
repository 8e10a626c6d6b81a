"""KvCache: the per-sequence KV operations every driver shares, exact on a tiny pool."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from choral.kv.block_pool import BlockPool
from choral.kv.kv_cache import KvCache
from choral.kv.sequence_state import SequenceState


def cache(num_blocks: int = 6, block_size: int = 4) -> KvCache:
    return KvCache(BlockPool(num_blocks, block_size))


def seq(tokens: list[int], computed: int = 0) -> SequenceState:
    return SequenceState(token_ids=list(tokens), num_computed_tokens=computed)


def test_allocate_slots_takes_whole_blocks_in_order() -> None:
    kv = cache()
    s = seq(list(range(10)))
    assert kv.allocate_slots(s, 0, 10) == []
    assert s.block_table == [0, 1, 2]
    assert kv.allocate_slots(s, 10, 12) == []  # still inside block 2
    assert s.block_table == [0, 1, 2]
    assert kv.allocate_slots(s, 12, 13) == []
    assert s.block_table == [0, 1, 2, 3]
    kv.check_integrity([s])


def test_allocate_slots_returns_none_and_changes_nothing_when_short() -> None:
    kv = cache(num_blocks=3)
    a, b = seq(list(range(8))), seq(list(range(8)))
    assert kv.allocate_slots(a, 0, 8) == []
    before = kv.usage()
    assert kv.allocate_slots(b, 0, 8) is None  # needs 2, 1 free
    assert b.block_table == [] and kv.usage() == before
    assert kv.allocate_slots(b, 0, 4) == [] and b.block_table == [2]
    kv.check_integrity([a, b])


def test_fork_shares_then_copy_on_write_of_the_partial_block() -> None:
    kv = cache()
    parent = seq(list(range(6)), computed=6)
    kv.allocate_slots(parent, 0, 6)  # blocks 0, 1 (1 is half full)
    child = SequenceState(token_ids=list(parent.token_ids))
    kv.fork(parent, child)
    assert child.block_table == [0, 1] and child.num_computed_tokens == 6
    assert [kv.pool.blocks[b].ref_count for b in (0, 1)] == [2, 2]
    # The child writes token 6 into block 1, which the parent still holds: copied first.
    assert kv.allocate_slots(child, 6, 7) == [(1, 2)]
    assert child.block_table == [0, 2] and parent.block_table == [0, 1]
    assert [kv.pool.blocks[b].ref_count for b in (0, 1, 2)] == [2, 1, 1]
    # Now the parent owns block 1 alone: no copy.
    assert kv.allocate_slots(parent, 6, 7) == []
    kv.check_integrity([parent, child])


def test_slots_needed_counts_a_batch_exactly() -> None:
    kv = cache()
    a = seq(list(range(6)), computed=6)
    kv.allocate_slots(a, 0, 6)
    b = SequenceState(token_ids=list(a.token_ids))
    kv.fork(a, b)
    released: Counter[int] = Counter()
    # a copies block 1 (1 new block); then b is block 1's only owner: no copy for b.
    assert kv.slots_needed(a, 6, 7, released) == 1
    assert kv.slots_needed(b, 6, 7, released) == 0
    assert kv.slots_needed(a, 6, 9, Counter()) == 2  # the copy plus block 2


def test_truncate_and_free_give_blocks_back() -> None:
    kv = cache()
    s = seq(list(range(12)), computed=12)
    kv.allocate_slots(s, 0, 12)
    kv.truncate(s, 5)
    assert s.block_table == [0, 1] and s.num_computed_tokens == 5
    assert kv.usage().num_used_blocks == 2
    kv.free(s)
    assert s.block_table == [] and kv.usage().num_used_blocks == 0
    kv.check_integrity([])


def test_blocks_freed_by_counts_only_blocks_held_alone() -> None:
    kv = cache()
    a = seq(list(range(6)), computed=6)
    kv.allocate_slots(a, 0, 6)
    b = SequenceState()
    kv.fork(a, b)
    kv.allocate_slots(b, 6, 9)  # b: block 1 copied to 2, block 3 new
    assert b.block_table == [0, 2, 3]
    assert kv.blocks_freed_by([b]) == 2  # block 0 is shared with a
    # Blocks 1, 2, 3; block 0 is shared by the two and not counted (a lower bound, as admission wants).
    assert kv.blocks_freed_by([a, b]) == 3


def test_prefix_cache_register_match_admit_and_revive() -> None:
    kv = cache(num_blocks=6)
    a = seq(list(range(1, 11)))  # 10 tokens: two full blocks and a partial one
    assert kv.admit(a, [], 10)
    a.num_computed_tokens = 10
    kv.register_full_blocks(a)
    assert len(a.block_hashes) == 2
    assert kv.match_prefix(a.token_ids) == [0, 1]
    assert kv.match_prefix([*a.token_ids[:8]]) == [0]  # the last token is always computed
    kv.free(a)
    assert kv.usage().num_cached_blocks == 2 and kv.usage().num_used_blocks == 0
    b = seq([*range(1, 9), 50, 51])
    hits = kv.match_prefix(b.token_ids)
    assert hits == [0, 1]
    assert kv.blocks_to_admit(hits, 2) == 3  # two revived hits plus one new block
    assert not kv.admit(b, hits, 2, headroom=4)  # would leave 3 of the 6 free, not 4
    assert b.block_table == []
    assert kv.admit(b, hits, 2, count_queries=True)
    assert b.block_table == [0, 1, 3] and b.num_computed_tokens == 8  # freed block 2 went to the back of the list
    assert kv.usage().prefix_hits == 2 and kv.usage().prefix_queries == 2
    kv.check_integrity([b])


def test_pins_keep_blocks_and_are_counted() -> None:
    kv = cache()
    a = seq(list(range(1, 9)), computed=8)
    kv.allocate_slots(a, 0, 8)
    kv.register_full_blocks(a)
    blocks = kv.cached_prefix_blocks(a.token_ids)
    assert blocks == [0, 1]
    assert kv.num_unpinned_among(blocks) == 2
    kv.pin(blocks)
    assert kv.num_pinned_blocks == 2 and kv.num_unpinned_blocks == 4
    kv.free(a)
    kv.unpin(blocks)
    assert kv.num_pinned_blocks == 0
    kv.check_integrity([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kv_tensors_are_zeroed_aligned_and_writable(dtype: torch.dtype) -> None:
    """The model runner's CPU cache tensors come from calloc (no start-up cost): still exact
    zeros, contiguous, 64-byte aligned for the kernels, and ordinary writable tensors."""
    from choral.engine.model_runner import _zeros

    for shape in [(3, 2, 8, 4), (1000, 1, 64, 16)]:
        x = _zeros(shape, dtype, torch.device("cpu"))
        assert x.shape == shape and x.dtype == dtype and x.is_contiguous()
        assert x.data_ptr() % 64 == 0
        assert not x.any()
        x[-1, -1, -1, -1] = 1.5
        assert x.sum().item() == 1.5
