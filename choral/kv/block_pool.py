"""The block pool: the one place that knows which KV blocks exist, who holds them, and what
they cache.

- Every block has a ref count: the number of sequences whose block table lists it. A block
  shared by a fork is counted once in memory and ``ref_count`` times in owners.
- Free blocks wait in a FIFO free list. A full block can also carry a content hash (chained over
  the blocks before it, checked against its stored tokens); when its last owner frees it, it
  becomes *evictable*: still cached, reusable by a later prefix match, and reclaimed in LRU order
  only when the free list runs dry.
- Pinned blocks are never evicted. Pins are counted per block, so prompts that share a prefix
  can be pinned and unpinned independently.

Paired check/commit methods (``can_allocate`` / ``allocate``) let callers decide before they
change anything, so running out of blocks is a result, never a half-done operation.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from choral.errors import KvCacheExhaustedError

# The parent of a chain's first block (no salt): any fixed int; not None, whose hash varies per process.
ROOT_HASH = 0x63686F72616C  # "choral" in ASCII; any fixed int would do


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """ceil(num_tokens / block_size): blocks a sequence of ``num_tokens`` holds."""
    return -(-num_tokens // block_size)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the tokens behind block_hash, to rule out hash collisions
    pin_count: int = 0  # pins are counted: two prompts sharing this block may each pin and unpin it

    @property
    def pinned(self) -> bool:
        return self.pin_count > 0


@dataclass(frozen=True)
class KvCacheSize:
    """Capacity of the pool, as reported at start-up."""

    num_blocks: int
    block_size: int
    bytes_per_token: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token


@dataclass
class BlockPoolStats:
    # Counted once per admission (not per lookup: a request waiting for room looks up every step).
    prefix_hits: int = 0  # full prompt blocks served by the prefix cache
    prefix_queries: int = 0  # full prompt blocks that could have been
    evictions: int = 0
    events: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, block_id, hash)


class BlockPool:
    """Fixed-size blocks with ref counts, a free list and an LRU prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, record_events: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first
        self._by_hash: dict[int, int] = {}  # block_hash -> block_id
        self.record_events = record_events
        self.stats = BlockPoolStats()

    # ---- capacity ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: truly free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_pinned_blocks(self) -> int:
        return sum(1 for b in self.blocks if b.pin_count)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix (in use or evictable)."""
        return len(self._by_hash)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks (ref count 1 each), or raise without taking any."""
        if not self.can_allocate(num_blocks):
            raise KvCacheExhaustedError(
                f"KV cache exhausted: need {num_blocks} block(s), {self.num_free_blocks} free "
                f"of {self.num_blocks}"
            )
        out = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)  # least recently used
                self._forget_hash(self.blocks[block_id], evicted=True)
            block = self.blocks[block_id]
            block.ref_count = 1
            out.append(block_id)
        return out

    def share(self, block_ids: Iterable[int]) -> None:
        """Add one owner to each block (a fork, or a prefix-cache hit already counted)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._take_back(block)
            block.ref_count += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each block; blocks with no owner left become free or evictable.

        Blocks are released in reverse so a sequence's tail is evicted before its head: the head is
        the prefix most likely to be shared again.
        """
        for block_id in reversed(list(block_ids)):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than it was owned")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.pinned:
                    continue  # held by the pin, still findable through its hash
                if block.block_hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    def needs_copy_on_write(self, block_id: int) -> bool:
        """A shared block must be copied before one owner writes into it."""
        return self.blocks[block_id].ref_count > 1

    def copy_on_write(self, block_id: int) -> int:
        """Give the caller a private copy of a shared block: a new block id (the caller copies
        the K/V data), one owner fewer on the old one. Raises KvCacheExhaustedError untouched."""
        (new_id,) = self.allocate(1)
        self.free([block_id])
        return new_id

    # ---- prefix cache ---------------------------------------------------------------------
    @staticmethod
    def chain_hash(parent_hash: int | None, token_ids: Sequence[int]) -> int:
        """Hash of a full block given the hash of the block before it (None for the first).

        Python's tuple hash over ints only: ints are not salted by PYTHONHASHSEED, so every
        process of one Python version computes the same chain (a replica router hashes prompts
        exactly as the replicas' pools do, docs/scale-out.md). ``hash(None)`` is an address in
        Python 3.11, so the first block's parent is the constant ``ROOT_HASH`` instead."""
        return hash((ROOT_HASH if parent_hash is None else parent_hash, tuple(token_ids)))

    def register(self, block_id: int, block_hash: int, token_ids: Sequence[int]) -> None:
        """Record that full block ``block_id`` holds ``token_ids`` after prefix ``block_hash``."""
        if len(token_ids) != self.block_size:
            raise ValueError("only full blocks can be registered")
        if block_hash in self._by_hash:
            return  # an equal block is cached already; this one stays private
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._by_hash[block_hash] = block_id
        self._event("stored", block)

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> int | None:
        """The cached block with this hash and exactly these tokens, or None. Does not share it
        (nor count it: the caller counts hits when it takes them, see ``stats``)."""
        block_id = self._by_hash.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def pin(self, block_ids: Iterable[int]) -> None:
        """Keep these (hashed) blocks out of eviction until unpinned as often as pinned."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.pin_count += 1
            self._evictable.pop(block_id, None)

    def unpin(self, block_ids: Iterable[int]) -> None:
        """Drop one pin from each block (blocks not pinned are left alone)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if not block.pin_count:
                continue
            block.pin_count -= 1
            if block.pin_count == 0 and block.ref_count == 0:
                self._evictable[block_id] = None

    def evict_all(self) -> int:
        """Drop every evictable cached block (e.g. after the weights change). Returns the count."""
        count = 0
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget_hash(self.blocks[block_id], evicted=True)
            self._free.append(block_id)
            count += 1
        return count

    # ---- internals ------------------------------------------------------------------------
    def _take_back(self, block: Block) -> None:
        if block.block_id in self._evictable:
            del self._evictable[block.block_id]
        elif not block.pinned:
            raise RuntimeError(f"block {block.block_id} has no owner and is not cached")

    def _forget_hash(self, block: Block, evicted: bool) -> None:
        if block.block_hash is not None:
            self._by_hash.pop(block.block_hash, None)
            if evicted:
                self.stats.evictions += 1
                self._event("evicted", block)
        block.block_hash = None
        block.token_ids = ()

    def _event(self, kind: str, block: Block) -> None:
        if self.record_events and block.block_hash is not None:
            self.stats.events.append((kind, block.block_id, block.block_hash))

    def check_invariants(self, owners: dict[int, int] | None = None) -> None:
        """Raise AssertionError if the pool's books disagree (tests call this after each step).

        ``owners`` maps block id -> how many block tables list it; when given, every ref count
        must equal it.
        """
        free = set(self._free)
        evictable = set(self._evictable)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not (free & evictable), "a block is both free and evictable"
        for block in self.blocks:
            in_free = block.block_id in free or block.block_id in evictable
            assert block.ref_count >= 0
            if block.ref_count > 0:
                assert not in_free, f"block {block.block_id} is used and free"
            elif not block.pinned:
                assert in_free, f"block {block.block_id} has no owner but is not free"
            if block.block_id in evictable:
                assert block.block_hash is not None
            if block.block_hash is not None:
                assert self._by_hash.get(block.block_hash) == block.block_id
            if owners is not None:
                assert block.ref_count == owners.get(block.block_id, 0), (
                    f"block {block.block_id}: ref_count {block.ref_count} != owners "
                    f"{owners.get(block.block_id, 0)}"
                )
