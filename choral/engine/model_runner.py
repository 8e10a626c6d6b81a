"""The model runner: owns the K/V tensors and every device call.

Callers hand it plain-Python chunks (tokens, where they go, which logits to return); it packs
them into one batch, runs one forward and hands back logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from choral.errors import ConfigError
from choral.kv.block_pool import KvCacheSize
from choral.loader.load import LoadedModel
from choral.lora.adapter import LoraAdapter
from choral.lora.apply import LoraBatch
from choral.lora.slots import LoraSlots
from choral.models.attention import AttentionLayout, kv_cache_shapes, make_backend, write_kv
from choral.models.rope import apply_rotary

logger = logging.getLogger(__name__)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV cache tensor. On the CPU through numpy, whose zeros come from calloc: fresh
    pages the OS zeroes on first touch, so a 1 GiB cache costs no time at start (torch.zeros
    writes every byte: ~1 s) and only the blocks a run uses become resident."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # numpy has no bfloat16: same-size integer zeros, viewed as the dtype (all-zero bits are 0.0).
    as_numpy = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
    if dtype not in as_numpy:
        return torch.zeros(shape, dtype=dtype)
    # calloc's pointer is 16-byte aligned; the kernels' vector loads like 64 (a cache line).
    itemsize = np.dtype(as_numpy[dtype]).itemsize
    numel = int(np.prod(shape))
    flat = np.zeros(numel + 64 // itemsize, dtype=as_numpy[dtype])
    skip = (-flat.ctypes.data % 64) // itemsize
    return torch.from_numpy(flat[skip : skip + numel].reshape(shape)).view(dtype)

DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB, like vLLM's CPU default of a few GiB scaled to this box


@dataclass
class Chunk:
    """A run of a sequence's tokens to compute in this step.

    ``start`` is the cache index of the first token; tokens land at cache indices
    ``start .. start + len(token_ids) - 1`` through ``block_table``. ``positions`` are the rope
    positions (default: the cache indices). ``logits`` says which rows to return:
    ``"last"``, ``"all"`` (prompt logprobs) or ``"none"``; ``hidden`` which rows' final hidden
    states (the final norm's output: embeddings) to return, the same way. ``lora`` is the
    adapter its rows run with.
    """

    token_ids: list[int]
    start: int
    block_table: list[int]
    positions: list[int] | None = None
    logits: str = "last"
    extra: dict[str, object] = field(default_factory=dict)
    hidden: str = "none"
    lora: LoraAdapter | None = None  # the adapter these tokens run with (None: the base model)
    # Rows embedded from vectors instead of their token ids (soft prompts): (offsets in the
    # chunk, table [n, hidden] in the model's dtype, the table's row for each offset).
    embeds: tuple[list[int], torch.Tensor, list[int]] | None = None


def plan_kv_size(loaded: LoadedModel, block_size: int, kv_cache_tokens: int | None,
                 kv_cache_memory_bytes: int | None, max_model_len: int) -> KvCacheSize:
    """Blocks for the pool from a token count, a byte budget, or the default budget."""
    spec = loaded.spec
    elem = torch.empty((), dtype=loaded.model.dtype).element_size()
    per_token = spec.kv_bytes_per_token * elem
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    else:
        budget = kv_cache_memory_bytes
        if budget is None:
            budget = DEFAULT_CPU_KV_BYTES
            if loaded.model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(loaded.model.device)
                budget = int(free * 0.8)
        tokens = budget // per_token
        # The default budget always fits one full-length sequence.
        if kv_cache_memory_bytes is None:
            tokens = max(tokens, max_model_len)
    num_blocks = -(-tokens // block_size)
    if num_blocks < 1:
        raise ConfigError(f"kv_cache_memory_bytes: too small for one block of {block_size} tokens "
                          f"({per_token * block_size} bytes)")
    return KvCacheSize(num_blocks=num_blocks, block_size=block_size, bytes_per_token=per_token)


class ModelRunner:
    """Runs packed batches of chunks through the model over the paged KV cache."""

    def __init__(self, loaded: LoadedModel, kv_size: KvCacheSize, attention_backend: str = "auto",
                 max_loras: int = 0, max_lora_rank: int = 16):
        self.model = loaded.model
        spec = loaded.spec
        self.spec = spec
        self.device = self.model.device
        self.block_size = kv_size.block_size
        self.kv_size = kv_size
        k_shape, v_shape = kv_cache_shapes(kv_size.num_blocks, kv_size.block_size, spec.num_kv_heads,
                                           spec.head_dim)
        self.k_caches = [_zeros(k_shape, self.model.dtype, self.device) for _ in range(spec.num_layers)]
        self.v_caches = [_zeros(v_shape, self.model.dtype, self.device) for _ in range(spec.num_layers)]
        self.attention = make_backend(attention_backend, self.device, spec.num_heads,
                                      spec.num_kv_heads, spec.head_dim, kv_size.block_size)
        # Device slots of the adapters steps use (enable_lora); None: no chunk may carry one.
        self.lora_slots = (LoraSlots(spec, max_loras, max_lora_rank, self.model.dtype, self.device)
                           if max_loras > 0 else None)

    def execute(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """One forward for all chunks. Returns per chunk its logits ([1, V] for ``last``,
        [n, V] for ``all``) or None."""
        return self.execute_with_hidden(chunks)[0]

    def execute_with_hidden(self, chunks: list[Chunk]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """One forward for all chunks: per chunk its logits (as :meth:`execute`) and its final
        hidden states as ``chunk.hidden`` asks ([1, hidden] / [n, hidden] fp32, or None)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        blocks: list[int] = []
        offsets: list[int] = []
        logits_rows: list[int] = []
        spans: list[tuple[int, int] | None] = []
        starts, lens, ctx, tables = [], [], [], []
        hidden_rows: list[int] = []
        hidden_spans: list[tuple[int, int] | None] = []
        for chunk in chunks:
            n = len(chunk.token_ids)
            offset = len(input_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(chunk.positions if chunk.positions is not None
                             else range(chunk.start, chunk.start + n))
            table = chunk.block_table
            blocks.extend(table[i // bs] for i in range(chunk.start, chunk.start + n))
            offsets.extend(i % bs for i in range(chunk.start, chunk.start + n))
            starts.append(offset)
            lens.append(n)
            ctx.append(chunk.start + n)
            tables.append(table)
            if chunk.logits == "last":
                spans.append((len(logits_rows), 1))
                logits_rows.append(offset + n - 1)
            elif chunk.logits == "all":
                spans.append((len(logits_rows), n))
                logits_rows.extend(range(offset, offset + n))
            else:
                spans.append(None)
            first = offset if chunk.hidden == "all" else offset + n - 1
            hidden_spans.append((len(hidden_rows), offset + n - first) if chunk.hidden != "none" else None)
            if chunk.hidden != "none":
                hidden_rows.extend(range(first, offset + n))
        dev = self.device
        layout = AttentionLayout(starts, lens, ctx, tables, bs)
        attention = self.attention.prepare(layout, dev)  # this step's own: the backend keeps none
        args = (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev),
                (torch.tensor(blocks, dtype=torch.long, device=dev),
                 torch.tensor(offsets, dtype=torch.long, device=dev)),
                attention, self.k_caches, self.v_caches)
        rows = torch.tensor(logits_rows, dtype=torch.long, device=dev)
        lora = self._lora_batch(chunks)
        embeds = self._input_embeds(chunks, starts)
        states: torch.Tensor | None = None
        if not hidden_rows:
            logits = self.model.forward(*args, rows, lora=lora, input_embeds=embeds)
        else:
            with torch.inference_mode():
                hidden = self.model.hidden_states(*args, lora=lora, input_embeds=embeds)  # [T, hidden]
                logits = self.model.logits(hidden, rows)
                states = self.model.final_hidden(hidden, torch.tensor(hidden_rows, dtype=torch.long, device=dev))
                states = states.float()
        return ([logits[s : s + n] if span is not None else None for span in spans for (s, n) in [span or (0, 0)]],
                [states[s : s + n] if span is not None and states is not None else None
                 for span in hidden_spans for (s, n) in [span or (0, 0)]])

    def _input_embeds(self, chunks: list[Chunk], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([R] rows of the batch, [R, hidden] vectors) for the chunks' soft positions, or None."""
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for chunk, start in zip(chunks, starts, strict=True):
            if chunk.embeds is None:
                continue
            offsets, table, table_rows = chunk.embeds
            rows.extend(start + o for o in offsets)
            parts.append(table.index_select(0, torch.tensor(table_rows, dtype=torch.long, device=table.device)))
        if not rows:
            return None
        return (torch.tensor(rows, dtype=torch.long, device=self.device),
                torch.cat(parts).to(device=self.device, dtype=self.model.dtype))

    def _lora_batch(self, chunks: list[Chunk]) -> LoraBatch | None:
        """The step's rows grouped by adapter slot (adapters loaded into slots as needed)."""
        adapters = [c.lora for c in chunks if c.lora is not None]
        if not adapters:
            return None
        if self.lora_slots is None:
            raise ConfigError("enable_lora: a step carries a LoRA adapter but the engine has no adapter slots")
        slot_of = self.lora_slots.assign(adapters)
        row_slots: list[int | None] = []
        for c in chunks:
            slot = slot_of[c.lora.adapter_id] if c.lora is not None else None
            row_slots.extend([slot] * len(c.token_ids))
        return LoraBatch(self.lora_slots, row_slots, self.device)

    def close(self) -> None:
        """Release what lives outside this process: nothing for one process (a tensor-parallel
        runner stops its workers)."""

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy K/V of block ``src`` into ``dst`` for every (src, dst): copy-on-write."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    # ---- direct K/V access (conversations: context shift, save and load) --------------------
    def _slots(self, block_table: list[int], start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([count] block ids, [count] offsets) of cache indices ``start .. start + count - 1``."""
        bs = self.block_size
        idx = range(start, start + count)
        return (torch.tensor([block_table[i // bs] for i in idx], dtype=torch.long, device=self.device),
                torch.tensor([i % bs for i in idx], dtype=torch.long, device=self.device))

    def read_tokens(self, block_table: list[int], count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K and V of cache indices ``0 .. count - 1``: per layer two [count, KVH, D] tensors."""
        blocks, offsets = self._slots(block_table, 0, count)
        keys = [k.permute(0, 3, 1, 2)[blocks, offsets] for k in self.k_caches]  # view k as [NB, BS, KVH, D]
        values = [v[blocks, offsets] for v in self.v_caches]
        return keys, values

    def write_tokens(self, block_table: list[int], start: int, keys: list[torch.Tensor],
                     values: list[torch.Tensor]) -> None:
        """Store per-layer K/V ([count, KVH, D] each) at cache indices ``start ..``."""
        blocks, offsets = self._slots(block_table, start, keys[0].shape[0])
        for k_cache, v_cache, k, v in zip(self.k_caches, self.v_caches, keys, values, strict=True):
            write_kv(k_cache, v_cache, blocks, offsets, k.to(self.device, k_cache.dtype),
                     v.to(self.device, v_cache.dtype))

    def move_tokens(self, block_table: list[int], src_start: int, dst_start: int, count: int) -> None:
        """Move the K/V of ``count`` tokens from cache index ``src_start`` to ``dst_start`` (same
        table), re-rotating keys by ``dst_start - src_start`` positions: the context shift.

        Every source is read before any destination is written, so the ranges may overlap. The
        caller makes the destination blocks private (copy-on-write) first.
        """
        if count <= 0:
            return
        src_blocks, src_offsets = self._slots(block_table, src_start, count)
        dst_blocks, dst_offsets = self._slots(block_table, dst_start, count)
        for layer, (k_cache, v_cache) in enumerate(zip(self.k_caches, self.v_caches, strict=True)):
            # Each layer's own rope table: Gemma 3's local layers rotate with another base.
            cos, sin = self.model.layer_rotary(layer).shift(dst_start - src_start)  # [1, 1, D] fp32
            k_view = k_cache.permute(0, 3, 1, 2)  # [NB, BS, KVH, D]
            k = k_view[src_blocks, src_offsets].float()  # [count, KVH, D] (a copy)
            v = v_cache[src_blocks, src_offsets]
            k = apply_rotary(k, cos.to(self.device), sin.to(self.device)).to(k_cache.dtype)
            write_kv(k_cache, v_cache, dst_blocks, dst_offsets, k, v)
