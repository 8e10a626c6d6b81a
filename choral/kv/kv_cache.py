"""KvCache: per-sequence operations on the shared paged KV cache, for every driver.

llama.cpp's ``llama_memory_seq_*`` is the model: the executor's sequences and the conversations
are two clients of these calls, neither owns block-table logic of its own. Each call either
completes or changes nothing:

- ``allocate_slots(seq, start, end)`` makes cache indices ``start .. end - 1`` writable (copies
  shared blocks on write, appends new blocks) and returns the (src, dst) block copies the model
  runner must make first, or None when the pool cannot give the blocks.
- ``fork`` shares every block (copy-on-write later), ``truncate`` drops the tail, ``free`` gives
  everything back.
- ``match_prefix`` / ``admit`` / ``register_full_blocks``: the automatic prefix cache (chained
  hashes over full blocks, checked against the stored tokens, in the pool).

Plain Python bookkeeping only: the K/V tensors belong to the model runner, and callers hold the
engine core's lock around every call (see choral/engine/engine_core.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from choral.kv.block_pool import BlockPool, blocks_for_tokens
from choral.kv.sequence_state import SequenceState

BlockCopy = tuple[int, int]  # (src, dst) block ids: copy src's K/V into dst before the step writes


@dataclass(frozen=True)
class KvUsage:
    """A snapshot of the pool's counters (taken under the core's lock, read anywhere)."""

    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_pinned_blocks: int
    prefix_hits: int
    prefix_queries: int
    evictions: int


class KvCache:
    """The per-sequence KV operations over one :class:`BlockPool`."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        # Kept current by pin/unpin (under the core's lock); one int, so any thread may read it
        # without the lock (intake checks requests against it on the caller's thread).
        self.num_pinned_blocks = pool.num_pinned_blocks

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_unpinned_blocks(self) -> int:
        """Blocks a request may ever hold: pinned prefix blocks are not the cache's to give."""
        return self.pool.num_blocks - self.num_pinned_blocks

    def usage(self) -> KvUsage:
        p = self.pool
        return KvUsage(p.num_blocks, p.num_used_blocks, p.num_free_blocks, p.num_cached_blocks,
                       p.num_pinned_blocks, p.stats.prefix_hits, p.stats.prefix_queries, p.stats.evictions)

    # ---- writes --------------------------------------------------------------------------------
    def slots_needed(self, seq: SequenceState, start: int, end: int, released: Counter[int] | None = None) -> int:
        """New blocks that writing cache indices ``start .. end - 1`` takes: blocks past the
        table's end plus shared blocks in the range (copied on write).

        ``released`` counts owners that earlier writers of the same batch drop from shared blocks
        (their own copy-on-write); it is updated, so a batch's total is exact.
        """
        if end <= start:
            return 0
        released = released if released is not None else Counter()
        bs = self.block_size
        last = blocks_for_tokens(end, bs)
        need = max(0, last - len(seq.block_table))
        for b in seq.block_table[start // bs : last]:
            if self.pool.blocks[b].ref_count - released[b] > 1:
                need += 1
                released[b] += 1
        return need

    def can_allocate(self, num_blocks: int, headroom: int = 0) -> bool:
        """Whether ``num_blocks`` more fit with ``headroom`` blocks left over (a batch's total)."""
        return num_blocks + headroom <= self.pool.num_free_blocks

    def allocate_slots(self, seq: SequenceState, start: int, end: int) -> list[BlockCopy] | None:
        """Make cache indices ``start .. end - 1`` of ``seq`` writable, or return None (nothing
        changed) when the pool cannot give the blocks. Returns the block copies to make first."""
        if end <= start:
            return []
        if not self.can_allocate(self.slots_needed(seq, start, end)):
            return None
        bs = self.block_size
        copies: list[BlockCopy] = []
        for i in range(start // bs, min(len(seq.block_table), blocks_for_tokens(end, bs))):
            old = seq.block_table[i]
            if self.pool.needs_copy_on_write(old):
                new = self.pool.copy_on_write(old)
                copies.append((old, new))
                seq.block_table[i] = new
                del seq.block_hashes[i:]  # the private copy is not registered (yet)
        missing = blocks_for_tokens(end, bs) - len(seq.block_table)
        if missing > 0:
            seq.block_table.extend(self.pool.allocate(missing))
        return copies

    # ---- structure -----------------------------------------------------------------------------
    def fork(self, parent: SequenceState, child: SequenceState) -> None:
        """``child`` gets ``parent``'s cache: every block shared (one more owner each)."""
        self.pool.share(parent.block_table)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def truncate(self, seq: SequenceState, num_tokens: int) -> None:
        """Keep the blocks holding cache indices ``0 .. num_tokens - 1``; free the rest."""
        keep = blocks_for_tokens(num_tokens, self.block_size)
        if keep < len(seq.block_table):
            self.pool.free(seq.block_table[keep:])
            del seq.block_table[keep:]
        full = num_tokens // self.block_size
        del seq.block_hashes[full:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    def free(self, seq: SequenceState) -> None:
        """Give every block back (shared ones lose one owner)."""
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def blocks_freed_by(self, seqs: Iterable[SequenceState]) -> int:
        """Blocks that freeing ``seqs`` surely gives back: those held by one owner only (a block
        that two of them share is not counted, so this is a lower bound)."""
        return len({b for s in seqs for b in s.block_table if self.pool.blocks[b].ref_count == 1})

    # ---- prefix cache --------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], salt: int | None = None) -> list[int]:
        """Cached blocks holding the longest prefix of ``token_ids`` (not yet shared) computed
        under ``salt`` (a sequence's ``cache_salt``: its adapter). The last token is always left
        to compute (its logits are needed)."""
        bs = self.block_size
        hits: list[int] = []
        parent: int | None = salt
        for i in range((len(token_ids) - 1) // bs):
            tokens = token_ids[i * bs : (i + 1) * bs]
            h = BlockPool.chain_hash(parent, tokens)
            block = self.pool.lookup(h, tokens)
            if block is None:
                break
            hits.append(block)
            parent = h
        return hits

    def blocks_to_admit(self, hits: list[int], num_new_tokens: int) -> int:
        """Free blocks an admission takes: new blocks plus evictable hits it revives."""
        total = blocks_for_tokens(len(hits) * self.block_size + num_new_tokens, self.block_size)
        blocks = self.pool.blocks
        revived = sum(1 for b in hits if blocks[b].ref_count == 0 and not blocks[b].pinned)
        return max(0, total - len(hits)) + revived

    def admit(self, seq: SequenceState, hits: list[int], num_new_tokens: int, headroom: int = 0,
              count_queries: bool = False) -> bool:
        """Give an empty ``seq`` the ``hits`` (shared) and blocks for ``num_new_tokens`` more, if
        that leaves ``headroom`` blocks free; else change nothing and return False."""
        if not self.can_allocate(self.blocks_to_admit(hits, num_new_tokens), headroom):
            return False
        self.pool.share(hits)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if count_queries:
            self.pool.stats.prefix_queries += (seq.num_tokens - 1) // self.block_size
            self.pool.stats.prefix_hits += len(hits)
        seq.block_hashes = []
        parent: int | None = seq.cache_salt
        for i in range(len(hits)):
            parent = BlockPool.chain_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(parent)
        copies = self.allocate_slots(seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens)
        assert copies == [], "an admission writes only into blocks of its own"
        return True

    def register_full_blocks(self, seq: SequenceState) -> None:
        """Offer every block of ``seq`` that is now full and computed to the prefix cache."""
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
        for i in range(len(seq.block_hashes), full):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            parent = BlockPool.chain_hash(parent, tokens)
            seq.block_hashes.append(parent)
            self.pool.register(seq.block_table[i], parent, tokens)

    def cached_prefix_blocks(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks of every full block of ``token_ids`` (the longest cached prefix)."""
        return self.match_prefix([*token_ids, 0])  # one token past: the last full block may match

    def pin(self, blocks: list[int]) -> None:
        """Keep these cached blocks out of eviction until unpinned as often (see BlockPool.pin)."""
        self.pool.pin(blocks)
        self.num_pinned_blocks = self.pool.num_pinned_blocks

    def unpin(self, blocks: list[int]) -> None:
        self.pool.unpin(blocks)
        self.num_pinned_blocks = self.pool.num_pinned_blocks

    def num_unpinned_among(self, blocks: list[int]) -> int:
        """How many of ``blocks`` a pin would take out of the cache for the first time."""
        return sum(1 for b in set(blocks) if not self.pool.blocks[b].pinned)

    def check_integrity(self, seqs: Iterable[SequenceState]) -> None:
        """Assert that the pool's ref counts equal the block tables of ``seqs`` (all owners)."""
        owners: Counter[int] = Counter()
        for s in seqs:
            owners.update(s.block_table)
        self.pool.check_invariants(dict(owners))
