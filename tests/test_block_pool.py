"""Exact tests of the block pool: ids, ref counts, free-list order, prefix cache, eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from choral.errors import KvCacheExhaustedError
from choral.kv.block_pool import BlockPool, blocks_for_tokens


def test_blocks_for_tokens_is_ceil() -> None:
    assert [blocks_for_tokens(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_in_order_and_free_fifo() -> None:
    pool = BlockPool(4, 16)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.num_free_blocks == 1
    pool.free([0, 1])  # freed tail first: 1 then 0 join the back of the free list
    assert pool.allocate(3) == [3, 1, 0]
    pool.check_invariants({0: 1, 1: 1, 2: 1, 3: 1})


def test_exhaustion_raises_and_changes_nothing() -> None:
    pool = BlockPool(3, 16)
    pool.allocate(2)
    assert not pool.can_allocate(2)
    with pytest.raises(KvCacheExhaustedError, match="need 2 block"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_invariants({0: 1, 1: 1})


def test_share_counts_owners_once_in_memory() -> None:
    pool = BlockPool(4, 16)
    table = pool.allocate(2)
    pool.share(table)  # a fork
    assert [pool.blocks[b].ref_count for b in table] == [2, 2]
    assert pool.num_used_blocks == 2
    pool.free(table)
    assert pool.num_used_blocks == 2
    pool.free(table)
    assert pool.num_free_blocks == 4
    pool.check_invariants({})


def test_copy_on_write() -> None:
    pool = BlockPool(4, 16)
    (b,) = pool.allocate(1)
    pool.share([b])
    assert pool.needs_copy_on_write(b)
    new = pool.copy_on_write(b)
    assert new != b and pool.blocks[b].ref_count == 1 and pool.blocks[new].ref_count == 1
    assert not pool.needs_copy_on_write(b)


def test_double_free_is_an_internal_error() -> None:
    pool = BlockPool(2, 16)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([b])


def test_prefix_cache_lookup_checks_tokens_and_evicts_lru() -> None:
    pool = BlockPool(3, 2)
    a, b = pool.allocate(2)
    ha = BlockPool.chain_hash(None, [1, 2])
    hb = BlockPool.chain_hash(ha, [3, 4])
    pool.register(a, ha, [1, 2])
    pool.register(b, hb, [3, 4])
    assert pool.lookup(ha, [1, 2]) == a
    assert pool.lookup(ha, [9, 9]) is None  # same hash, other tokens: a collision is a miss
    pool.free([a, b])  # tail first: b becomes least recently used... then a
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 2
    # The untouched block 2 is used first; then the LRU cached one (b) is evicted.
    assert pool.allocate(1) == [2]
    assert pool.allocate(1) == [b]
    assert pool.lookup(hb, [3, 4]) is None
    assert pool.lookup(ha, [1, 2]) == a
    pool.share([a])  # a cache hit revives the evictable block
    assert pool.blocks[a].ref_count == 1 and pool.num_free_blocks == 0
    pool.check_invariants({a: 1, b: 1, 2: 1})


def test_pinned_blocks_are_never_evicted() -> None:
    pool = BlockPool(2, 2)
    (a,) = pool.allocate(1)
    h = BlockPool.chain_hash(None, [5, 6])
    pool.register(a, h, [5, 6])
    pool.pin([a])
    pool.free([a])
    assert pool.num_free_blocks == 1
    pool.allocate(1)
    with pytest.raises(KvCacheExhaustedError):
        pool.allocate(1)
    assert pool.lookup(h, [5, 6]) == a
    pool.unpin([a])
    assert pool.allocate(1) == [a]


def test_pins_are_counted() -> None:
    pool = BlockPool(2, 2)
    (a,) = pool.allocate(1)
    h = BlockPool.chain_hash(None, [5, 6])
    pool.register(a, h, [5, 6])
    pool.pin([a])
    pool.pin([a])  # two prompts sharing this block both pin it
    pool.free([a])
    assert pool.num_pinned_blocks == 1 and pool.num_free_blocks == 1
    pool.unpin([a])
    assert pool.num_free_blocks == 1 and pool.lookup(h, [5, 6]) == a  # still pinned once
    pool.unpin([a])
    pool.unpin([a])  # an extra unpin is a no-op
    assert pool.num_pinned_blocks == 0 and pool.num_free_blocks == 2
    pool.check_invariants({})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "share", "free", "cache"]),
                          st.integers(0, 5)), max_size=60))
def test_random_operations_keep_invariants(ops: list[tuple[str, int]]) -> None:
    pool = BlockPool(8, 2)
    tables: list[list[int]] = []
    counter = 0
    for op, arg in ops:
        if op == "alloc":
            if pool.can_allocate(arg):
                tables.append(pool.allocate(arg))
            else:
                with pytest.raises(KvCacheExhaustedError):
                    pool.allocate(arg)
        elif op == "share" and tables:
            t = tables[arg % len(tables)]
            pool.share(t)
            tables.append(list(t))
        elif op == "free" and tables:
            pool.free(tables.pop(arg % len(tables)))
        elif op == "cache" and tables and tables[arg % len(tables)]:
            counter += 1
            pool.register(tables[arg % len(tables)][0], counter, [counter, counter])
        owners: dict[int, int] = {}
        for t in tables:
            for blk in t:
                owners[blk] = owners.get(blk, 0) + 1
        pool.check_invariants(owners)
    for t in tables:
        pool.free(t)
    pool.check_invariants({})
    assert pool.num_free_blocks == pool.num_blocks
