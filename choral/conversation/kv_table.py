"""A conversation's slice of the shared paged KV cache: its block table and the edits on it.

The table lists block ids in token order (cache index i lives in ``blocks[i // block_size]``).
Blocks may be shared with forks; a shared block is copied before this table writes into it
(copy-on-write), so a fork costs nothing until one side writes into the partly filled last block.
Every edit checks what it needs from the pool first and raises
:class:`~choral.errors.KvCacheExhaustedError` before changing anything.
"""

from __future__ import annotations

from collections import Counter

import torch

from choral.engine.model_runner import ModelRunner
from choral.errors import KvCacheExhaustedError
from choral.kv.block_pool import BlockPool, blocks_for_tokens


class KvTable:
    """Block ids of one conversation plus the pool/runner calls that edit them."""

    def __init__(self, pool: BlockPool, runner: ModelRunner, blocks: list[int] | None = None):
        self.pool = pool
        self.runner = runner
        self.blocks: list[int] = blocks if blocks is not None else []

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    # ---- writes ------------------------------------------------------------------------------
    def blocks_to_write(self, start: int, end: int, released: Counter[int] | None = None) -> int:
        """New blocks that writing cache indices ``start .. end - 1`` takes: blocks past the
        table's end plus shared blocks in the range (copied on write).

        ``released`` counts owners that earlier writers in the same batch will drop from shared
        blocks (their own copy-on-write); it is updated, so a batch's total is exact.
        """
        if end <= start:
            return 0
        released = released if released is not None else Counter()
        bs = self.block_size
        last = blocks_for_tokens(end, bs)
        need = max(0, last - len(self.blocks))
        for b in self.blocks[start // bs : last]:
            if self.pool.blocks[b].ref_count - released[b] > 1:
                need += 1
                released[b] += 1
        return need

    def prepare_write(self, start: int, end: int) -> None:
        """Make cache indices ``start .. end - 1`` writable: copy shared blocks, add new ones.
        Raises KvCacheExhaustedError before changing anything."""
        if end <= start:
            return
        need = self.blocks_to_write(start, end)
        if not self.pool.can_allocate(need):
            raise KvCacheExhaustedError(
                f"KV cache exhausted: need {need} block(s), {self.pool.num_free_blocks} free of "
                f"{self.pool.num_blocks}; close a conversation and retry"
            )
        bs = self.block_size
        copies: list[tuple[int, int]] = []
        for i in range(start // bs, min(len(self.blocks), blocks_for_tokens(end, bs))):
            old = self.blocks[i]
            if self.pool.needs_copy_on_write(old):
                new = self.pool.copy_on_write(old)
                copies.append((old, new))
                self.blocks[i] = new
        self.runner.copy_blocks(copies)
        missing = blocks_for_tokens(end, bs) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(self.pool.allocate(missing))

    # ---- structure ---------------------------------------------------------------------------
    def fork(self) -> KvTable:
        """A second table over the same blocks (one more owner each)."""
        self.pool.share(self.blocks)
        return KvTable(self.pool, self.runner, list(self.blocks))

    def truncate(self, num_tokens: int) -> None:
        """Keep the blocks that hold cache indices ``0 .. num_tokens - 1``; free the rest."""
        keep = blocks_for_tokens(num_tokens, self.block_size)
        if keep < len(self.blocks):
            self.pool.free(self.blocks[keep:])
            del self.blocks[keep:]

    def erase_and_shift(self, start: int, end: int, num_tokens: int) -> None:
        """Drop cache indices ``start .. end - 1`` of a ``num_tokens``-token cache and move the
        rest down to ``start``, keys re-rotated to their new positions. Raises
        KvCacheExhaustedError (nothing changed) when a shared block cannot be copied."""
        tail = num_tokens - end
        self.prepare_write(start, start + tail)
        self.runner.move_tokens(self.blocks, end, start, tail)
        self.truncate(start + tail)

    def release(self) -> None:
        """Give every block back (shared ones lose one owner)."""
        self.pool.free(self.blocks)
        self.blocks = []

    # ---- save / load -------------------------------------------------------------------------
    def read(self, num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.runner.read_tokens(self.blocks, num_tokens)

    def write(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Fill an empty table with ``keys``/``values`` (per layer [n, KVH, D])."""
        n = keys[0].shape[0]
        if n == 0:
            return
        self.prepare_write(0, n)
        self.runner.write_tokens(self.blocks, 0, keys, values)
