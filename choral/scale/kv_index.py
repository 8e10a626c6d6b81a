"""A replica's cached blocks, kept from its engine's KV events.

The block pool records an event when a full block enters the prefix cache (``stored``: the block
now answers lookups for its chained hash) and when a cached block is reclaimed (``evicted``).
Applied in order, the events give the set of hashes the replica can serve from cache now, which
it reports to the routers as Serve routing stats (replica.py). Reporting the set rather than the
events keeps every router right however many reports it misses.
"""

from __future__ import annotations

from collections.abc import Iterable

STORED = "stored"
EVICTED = "evicted"


class KvEventIndex:
    """The chained hashes of the blocks a replica caches, by block id (one hash per block)."""

    def __init__(self) -> None:
        self._by_block: dict[int, int] = {}  # block id -> the hash it caches
        self.num_events = 0

    def apply(self, events: Iterable[tuple[str, int, int]]) -> None:
        """Apply ``(kind, block id, hash)`` events in the order the pool recorded them."""
        for kind, block_id, block_hash in events:
            if kind == STORED:
                self._by_block[block_id] = block_hash
            elif kind == EVICTED:
                if self._by_block.get(block_id) == block_hash:
                    del self._by_block[block_id]
            else:
                raise ValueError(f"unknown KV event kind {kind!r}")
            self.num_events += 1

    @property
    def num_blocks(self) -> int:
        return len(self._by_block)

    def hashes(self) -> list[int]:
        """Every cached block's hash (unordered)."""
        return list(self._by_block.values())
