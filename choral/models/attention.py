"""Attention over the paged KV cache: the seam between bookkeeping and kernels.

A forward step describes its batch as an :class:`AttentionLayout` (plain Python). A backend turns
that into the step's own attention batch once per step (``prepare`` returns it: the tensors live
on the batch, never on the backend, so two steps can never see each other's layout), and the
batch runs each layer (``attend``).

Two backends:
- :class:`TorchPagedAttention`: pure torch, any device. Gathers each sequence's blocks into a
  contiguous view and runs ``scaled_dot_product_attention``. The reference implementation.
- :class:`CpuKernelAttention`: the C kernel of ``choral/kernels``, which reads K/V through the
  block tables directly (no gather copy). Used on CPU when it compiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from choral.kernels.paged_attention import PagedAttention

# cuDNN's fused attention plans a graph for every new shape, and here shapes change every step
# (a decode's key length grows by one, prefill chunks vary): keep CUDA to the other kernels.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float) -> torch.Tensor:
    """Attention of q [B, H, n, D] over k, v [B, KVH, K, D] (H a multiple of KVH), with a
    boolean mask broadcastable to [B, H, n, K]. Returns [B, H, n, D]."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # On CUDA, ``enable_gqa`` with a mask runs only the unfused math kernel (about ten launches
    # per call); repeating the KV heads lets the fused memory-efficient kernel take it.
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    with sdpa_kernel(_CUDA_SDPA):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@dataclass(frozen=True)
class AttentionLayout:
    """Where each sequence's query tokens sit in the packed batch and what cache they see.

    For sequence i: its tokens are ``query_start[i] : query_start[i] + query_len[i]`` of the batch,
    and after this step its cache holds ``context_len[i]`` tokens (the queries' own included, the
    last query at cache index ``context_len[i] - 1``). ``block_tables[i]`` lists its blocks.
    """

    query_start: list[int]
    query_len: list[int]
    context_len: list[int]
    block_tables: list[list[int]]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return sum(self.query_len)


# The cache layout every backend shares, per layer:
#   k_cache [num_blocks, KVH, D, block_size]  keys transposed inside a block, so the CPU kernel's
#                                             scores are vector FMAs over the block's tokens
#   v_cache [num_blocks, block_size, KVH, D]
def kv_cache_shapes(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (num_blocks, num_kv_heads, head_dim, block_size), (num_blocks, block_size, num_kv_heads, head_dim)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,  # [T] block id of each new token
    offsets: torch.Tensor,  # [T] its offset inside the block
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
) -> None:
    """Store this step's keys and values at their cache slots."""
    k_cache.permute(0, 3, 1, 2).index_put_((blocks, offsets), k)  # view as [NB, BS, KVH, D]
    v_cache.index_put_((blocks, offsets), v)


def gather_keys(k_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Keys of the listed blocks in token order: blocks [..., nb] -> [..., KVH, nb * BS, D]."""
    kb = k_cache[blocks]  # [..., nb, KVH, D, BS]
    nd = kb.dim()
    kb = kb.permute(*range(nd - 4), nd - 3, nd - 4, nd - 1, nd - 2)  # [..., KVH, nb, BS, D]
    return kb.reshape(*kb.shape[:-3], kb.shape[-3] * kb.shape[-2], kb.shape[-1])


def gather_values(v_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Values of the listed blocks in token order: blocks [..., nb] -> [..., KVH, nb * BS, D]."""
    vb = v_cache[blocks]  # [..., nb, BS, KVH, D]
    vb = vb.reshape(*vb.shape[:-4], vb.shape[-4] * vb.shape[-3], *vb.shape[-2:])  # [..., T, KVH, D]
    return vb.transpose(-3, -2)


class AttentionBatch(Protocol):
    """One step's attention: built by ``AttentionBackend.prepare``, used by every layer."""

    def attend(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,  # [num_blocks, KVH, D, block_size]
        v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
        window: int | None,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        ...


class AttentionBackend(Protocol):
    def prepare(self, layout: AttentionLayout, device: torch.device) -> AttentionBatch: ...


def _padded_tables(tables: list[list[int]]) -> list[list[int]]:
    width = max((len(t) for t in tables), default=1) or 1
    return [t + [0] * (width - len(t)) for t in tables]


class TorchPagedAttention:
    """Reference backend: gather blocks, mask, ``scaled_dot_product_attention``."""

    def prepare(self, layout: AttentionLayout, device: torch.device) -> TorchAttentionBatch:
        return TorchAttentionBatch(layout, device)


class TorchAttentionBatch:
    """One step of :class:`TorchPagedAttention`: the decode rows' padded block tables and the
    prompt chunks' blocks, as tensors, and the masks per window (built on first use)."""

    def __init__(self, layout: AttentionLayout, device: torch.device):
        self.layout = layout
        self.device = device
        bs = layout.block_size
        decode = [i for i, n in enumerate(layout.query_len) if n == 1]
        self.decode_rows = decode
        if decode:
            tables = _padded_tables([layout.block_tables[i] for i in decode])
            self.decode_tokens = torch.tensor([layout.query_start[i] for i in decode], device=device)
            self.decode_blocks = torch.tensor(tables, device=device)  # [Bd, max_blocks]
            ctx = torch.tensor([layout.context_len[i] for i in decode], device=device)
            self.decode_ctx = ctx
            self.decode_key_pos = torch.arange(len(tables[0]) * bs, device=device)  # [K]
        self.prefill = []
        for i, n in enumerate(layout.query_len):
            if n > 1:
                ctx_len = layout.context_len[i]
                blocks = torch.tensor(layout.block_tables[i][: -(-ctx_len // bs)], device=device)
                self.prefill.append((layout.query_start[i], n, ctx_len, blocks))
        self._mask_cache: dict[int | None, tuple[torch.Tensor | None, list[torch.Tensor]]] = {}

    def _masks(self, window: int | None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        if window not in self._mask_cache:
            decode_mask = None
            if self.decode_rows:
                kpos = self.decode_key_pos[None, :]
                qpos = (self.decode_ctx - 1)[:, None]
                ok = kpos <= qpos
                if window is not None:
                    ok &= kpos > qpos - window
                decode_mask = ok[:, None, None, :]  # [Bd, 1, 1, K]
            prefill_masks = []
            for _, n, ctx_len, _ in self.prefill:
                kpos = torch.arange(ctx_len, device=self.device)[None, :]
                qpos = torch.arange(ctx_len - n, ctx_len, device=self.device)[:, None]
                ok = kpos <= qpos
                if window is not None:
                    ok &= kpos > qpos - window
                prefill_masks.append(ok[None, None])  # [1, 1, n, ctx]
            self._mask_cache[window] = (decode_mask, prefill_masks)
        return self._mask_cache[window]

    def attend(self, q, k_cache, v_cache, window, scale):  # type: ignore[no-untyped-def]
        out = torch.empty_like(q)
        decode_mask, prefill_masks = self._masks(window)
        if self.decode_rows:
            keys = gather_keys(k_cache, self.decode_blocks)  # [Bd, KVH, K, D]
            vals = gather_values(v_cache, self.decode_blocks)
            qd = q.index_select(0, self.decode_tokens).unsqueeze(2)  # [Bd, H, 1, D]
            o = sdpa(qd, keys, vals, decode_mask, scale)  # [Bd, H, 1, D]
            out.index_copy_(0, self.decode_tokens, o.squeeze(2))
        for (start, n, ctx_len, blocks), mask in zip(self.prefill, prefill_masks, strict=True):
            keys = gather_keys(k_cache, blocks)[:, :ctx_len]  # [KVH, ctx, D]
            vals = gather_values(v_cache, blocks)[:, :ctx_len]
            qp = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            o = sdpa(qp, keys.unsqueeze(0), vals.unsqueeze(0), mask, scale)  # [1, H, n, D]
            out[start : start + n] = o[0].transpose(0, 1)
        return out


class CpuKernelAttention:
    """The C kernel for every query run, decodes and prompt chunks alike: each query token reads
    its own keys through the block table. Prompt chunks were once sent to torch's flash
    attention, but the kernel (which shares each K/V load among a KV head's query heads) beat it
    at every chunk length measured: one 512-token prompt's attention over 30 layers, fp32
    167 -> 111 ms, bf16 176 -> 86 ms; a 2048-token one 2.43 -> 1.91 s; 4 x 128 tokens 90 -> 33 ms."""

    def __init__(self, kernel: PagedAttention, num_threads: int):
        self.kernel = kernel
        self.num_threads = num_threads

    def prepare(self, layout: AttentionLayout, device: torch.device) -> CpuKernelBatch:
        return CpuKernelBatch(self.kernel, self.num_threads, layout)

    @classmethod
    def supports(cls, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int) -> bool:
        if device.type != "cpu":
            return False
        kernel = PagedAttention.load()
        return kernel is not None and kernel.supports(num_heads, num_kv_heads, head_dim, block_size)


class CpuKernelBatch:
    """One step of :class:`CpuKernelAttention`: per query token its sequence's row in the block
    tables and its causal limit, as int32 tensors the kernel reads."""

    def __init__(self, kernel: PagedAttention, num_threads: int, layout: AttentionLayout):
        self.kernel = kernel
        self.num_threads = num_threads
        # Per query token: its sequence's row in the block tables, and how many cached tokens it
        # sees (causal: its own position + 1). The runner packs sequences in order, so q goes to
        # the kernel as is; any other layout is gathered into that order and scattered back.
        seq_of_token: list[int] = []
        limit_of_token: list[int] = []
        rows: list[int] = []
        for row, (start, n, ctx_len) in enumerate(
                zip(layout.query_start, layout.query_len, layout.context_len, strict=True)):
            seq_of_token.extend([row] * n)
            limit_of_token.extend(range(ctx_len - n + 1, ctx_len + 1))
            rows.extend(range(start, start + n))
        self.num_tokens = len(rows)
        self.in_order = rows == list(range(len(rows)))
        self.rows = torch.tensor(rows, dtype=torch.long)
        tables = _padded_tables(layout.block_tables)
        width = len(tables[0]) if tables else 1
        # [S, max_blocks] int32, also for S == 0 (the kernel wrapper checks every id against the cache)
        self.block_tables = torch.tensor(tables, dtype=torch.int32).reshape(len(tables), width)
        self.tok_seq = torch.tensor(seq_of_token, dtype=torch.int32)
        self.tok_limit = torch.tensor(limit_of_token, dtype=torch.int32)

    def attend(self, q, k_cache, v_cache, window, scale):  # type: ignore[no-untyped-def]
        queries = q.contiguous() if self.in_order else q.index_select(0, self.rows)
        out = self.kernel(queries, k_cache, v_cache, self.block_tables, self.tok_seq, self.tok_limit, window or 0,
                          scale, self.num_threads)
        if self.in_order:
            return out
        return torch.empty_like(q).index_copy_(0, self.rows, out)


def make_backend(
    name: str, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> AttentionBackend:
    """``auto`` picks the C kernel on CPU when it is available, else torch."""
    if name == "torch":
        return TorchPagedAttention()
    kernel_ok = CpuKernelAttention.supports(device, num_heads, num_kv_heads, head_dim, block_size)
    if name == "kernel" and not kernel_ok:
        from choral.errors import ConfigError

        raise ConfigError(
            "attention_backend: 'kernel' needs a CPU device, a C compiler, block_size <= 256, "
            "head_dim <= 256 and at most 16 query heads per KV head"
        )
    if kernel_ok:
        kernel = PagedAttention.load()
        assert kernel is not None
        return CpuKernelAttention(kernel, torch.get_num_threads())
    return TorchPagedAttention()
