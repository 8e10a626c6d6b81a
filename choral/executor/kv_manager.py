"""KV allocation for executor sequences, with the automatic prefix cache.

The pool keeps blocks, ref counts, hashes and LRU; this file decides which blocks a sequence
gets: on admission the prompt's full blocks are looked up by chained hash (checked against the
stored tokens) and shared instead of recomputed; after every step the sequence's newly filled
blocks are registered so later requests (and this one after a preemption) can reuse them.
"""

from __future__ import annotations

from choral.executor.job import ExecSequence
from choral.kv.block_pool import BlockPool, blocks_for_tokens


class KvManager:
    def __init__(self, pool: BlockPool, enable_prefix_cache: bool):
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_prefix_cache = enable_prefix_cache

    # ---- admission -------------------------------------------------------------------------
    def match_prefix(self, seq: ExecSequence) -> list[int]:
        """Cached blocks holding the longest prefix of ``seq``'s tokens (not yet shared).

        The last token is always recomputed (its logits are needed), so at most
        ``(num_tokens - 1) // block_size`` blocks match.
        """
        if not self.enable_prefix_cache:
            return []
        if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens:
            return []  # prompt logprobs need the logits of every prompt position: compute them all
        bs = self.block_size
        hits: list[int] = []
        parent: int | None = None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = BlockPool.chain_hash(parent, tokens)
            block = self.pool.lookup(h, tokens)
            if block is None:
                break
            hits.append(block)
            parent = h
        return hits

    def blocks_to_admit(self, seq: ExecSequence, hits: list[int], num_new_tokens: int) -> int:
        """Free blocks admission would consume: new blocks plus evictable hits it revives."""
        total = blocks_for_tokens(len(hits) * self.block_size + num_new_tokens, self.block_size)
        revived = sum(1 for b in hits if self.pool.blocks[b].ref_count == 0 and not self.pool.blocks[b].pinned)
        return max(0, total - len(hits)) + revived

    def admit(self, seq: ExecSequence, hits: list[int], num_new_tokens: int) -> None:
        """Share the hits, allocate the rest for ``num_new_tokens`` (caller checked capacity)."""
        self.pool.share(hits)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_prefix_cache:
            self.pool.stats.prefix_queries += (seq.num_tokens - 1) // self.block_size
            self.pool.stats.prefix_hits += len(hits)
        if seq.num_preemptions == 0:
            # The prompt tokens the cache saved this request. A preempted sequence finds its own
            # blocks again on readmission: those were computed by the request itself.
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        seq.block_hashes = []
        parent: int | None = None
        for i in range(len(hits)):
            parent = BlockPool.chain_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(parent)
        self.grow(seq, num_new_tokens)

    # ---- running ---------------------------------------------------------------------------
    def blocks_to_grow(self, seq: ExecSequence, num_new_tokens: int) -> int:
        """Free blocks needed to compute ``num_new_tokens`` more (incl. a copy-on-write)."""
        need = seq.blocks_needed(num_new_tokens, self.block_size)
        return need + (1 if self._shared_write_block(seq) is not None else 0)

    def grow(self, seq: ExecSequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Allocate for ``num_new_tokens``; returns (src, dst) block copies to make first."""
        copies = []
        index = self._shared_write_block(seq)
        if index is not None:
            old = seq.block_table[index]
            new = self.pool.copy_on_write(old)
            seq.block_table[index] = new
            copies.append((old, new))
        need = seq.blocks_needed(num_new_tokens, self.block_size)
        if need:
            seq.block_table.extend(self.pool.allocate(need))
        return copies

    def _shared_write_block(self, seq: ExecSequence) -> int | None:
        # The block that the next token lands in, when a fork still shares it.
        index = seq.num_computed_tokens // self.block_size
        if index < len(seq.block_table) and self.pool.needs_copy_on_write(seq.block_table[index]):
            return index
        return None

    def register_full_blocks(self, seq: ExecSequence) -> None:
        """Offer every block that is now full and computed to the prefix cache."""
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), full):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            parent = BlockPool.chain_hash(parent, tokens)
            seq.block_hashes.append(parent)
            self.pool.register(seq.block_table[i], parent, tokens)

    def fork(self, parent: ExecSequence, child: ExecSequence) -> None:
        """``child`` shares every block of ``parent`` (the partial last one is copied on write)."""
        self.pool.share(parent.block_table)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_tokens = parent.num_cached_tokens

    def free(self, seq: ExecSequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.block_hashes = []
