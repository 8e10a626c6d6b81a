"""Embeddings of whole inputs: one prefill each, on a KV cache of the embedder's own.

An input's embedding is its tokens' final hidden states (the final norm's output, what the
lm_head reads) pooled: the last token's (``last``, which has attended to every token: how
decoder-only embedding models are trained) or the mean over the tokens (``mean``), then
L2-normalized unless asked not to. Inputs are packed several to a forward, each in its own run
of blocks of a private cache (made on first use, ``capacity`` tokens), so embedding never takes
KV blocks from generation; the model's weights are shared. One embedding forward runs at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from choral.engine.model_runner import Chunk, ModelRunner
from choral.errors import InvalidRequestError
from choral.kv.block_pool import KvCacheSize
from choral.loader.load import LoadedModel

POOLINGS = ("last", "mean")


class Embedder:
    """Turns token-id inputs into pooled embeddings [hidden] fp32."""

    def __init__(self, loaded: LoadedModel, max_model_len: int, block_size: int = 16,
                 capacity: int | None = None, attention_backend: str = "auto"):
        self.loaded = loaded
        self.max_model_len = max_model_len
        self.block_size = block_size
        # Room for the longest input, and for a batch of short ones.
        tokens = max(capacity or 0, max_model_len, 2048)
        self.num_blocks = -(-tokens // block_size)
        self._attention_backend = attention_backend
        self._runner: ModelRunner | None = None
        self._lock = threading.Lock()

    @property
    def hidden_size(self) -> int:
        return self.loaded.spec.hidden_size

    def embed(self, inputs: Sequence[Sequence[int]], pooling: str = "last",
              normalize: bool = True) -> list[torch.Tensor]:
        """One [hidden] fp32 vector per input. InvalidRequestError names a bad input."""
        if self.loaded.tensor_parallel_size > 1:
            raise InvalidRequestError("embeddings: not available under tensor parallelism (the weights here are "
                                      "one rank's shard); serve embeddings from a tensor_parallel_size=1 engine")
        if pooling not in POOLINGS:
            raise InvalidRequestError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        vocab = self.loaded.spec.vocab_size
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequestError(f"input[{i}]: empty (no tokens to embed)")
            if len(ids) > self.max_model_len:
                raise InvalidRequestError(f"input[{i}]: {len(ids)} tokens exceed the model's maximum context "
                                          f"length {self.max_model_len}")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"input[{i}]: token id {bad} is out of range [0, {vocab})")
        out: list[torch.Tensor] = []
        with self._lock:
            runner = self._get_runner()
            for batch in self._batches(inputs):
                chunks, next_block = [], 0
                for ids in batch:
                    blocks = -(-len(ids) // self.block_size)
                    table = list(range(next_block, next_block + blocks))
                    next_block += blocks
                    rows = "all" if pooling == "mean" else "last"
                    chunks.append(Chunk(list(ids), 0, table, logits="none", hidden=rows))
                _, states = runner.execute_with_hidden(chunks)
                for state in states:
                    assert state is not None  # every chunk asked for hidden states
                    vector = state.mean(dim=0) if pooling == "mean" else state[-1]  # [hidden]
                    out.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
        return out

    def _batches(self, inputs: Sequence[Sequence[int]]) -> list[list[Sequence[int]]]:
        """Consecutive inputs grouped so each group's blocks fit the cache."""
        batches: list[list[Sequence[int]]] = []
        used = self.num_blocks
        for ids in inputs:
            blocks = -(-len(ids) // self.block_size)
            if used + blocks > self.num_blocks:
                batches.append([])
                used = 0
            batches[-1].append(ids)
            used += blocks
        return batches

    def _get_runner(self) -> ModelRunner:
        if self._runner is None:
            loaded = self.loaded
            elem = torch.empty((), dtype=loaded.model.dtype).element_size()
            size = KvCacheSize(num_blocks=self.num_blocks, block_size=self.block_size,
                               bytes_per_token=loaded.spec.kv_bytes_per_token * elem)
            self._runner = ModelRunner(loaded, size, self._attention_backend)
        return self._runner
