"""KV cache bookkeeping: the block pool (plain Python). The K/V tensors live in the model runner."""

from choral.kv.block_pool import BlockPool, KvCacheSize, blocks_for_tokens

__all__ = ["BlockPool", "KvCacheSize", "blocks_for_tokens"]
