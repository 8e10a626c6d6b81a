"""SequenceState: what the KV cache needs to know about one stream of tokens.

Executor sequences and conversations are both a SequenceState: the tokens, how many of them
have their K/V in the cache, and the block table that says where (cache index ``i`` lives in
``block_table[i // block_size]``). The state owns its tokens and table; the block pool owns the
blocks; only :class:`~choral.kv.kv_cache.KvCache` edits a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False, kw_only=True)  # identity: two states with equal tokens are still two streams
class SequenceState:
    """Tokens, the number computed, the block table and the prefix-cache hashes of its full blocks."""

    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of registered full blocks
    # Where its prefix-cache hash chain starts: None for the base model; a LoRA adapter's own
    # value, so two adapters (or an adapter and the base) never share KV blocks.
    cache_salt: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
