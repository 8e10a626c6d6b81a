"""Typed wrapper of ``rope_kv.c``: rotary embedding of q and k fused with the store of k and v into
the paged KV cache (fp32 or bf16, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from choral.kernels.build import load_library
from choral.kernels.checks import INT, INT_MAX, PTR, IndexCheck, bad, bind, contiguous, cpu_tensor, same_shape

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_KERNEL = "rope_kv"
MAX_HEAD_DIM = 512  # rope_kv.c rotates a head in a stack buffer of this many floats
_INT64 = torch.int64


class RopeKv:
    """``rope_kv(qk, v, cos, sin, blocks, offsets, k_cache, v_cache)`` -> rotated q [T, H, D].

    qk [T, H + KVH, D] (q heads, then k heads) and v [T, KVH, D] may be row-strided views of the
    fused qkv projection, with contiguous heads; cos and sin hold [T, D] contiguous values
    ([T, 1, D] as the rotary table returns them); blocks and offsets [T] int64 give each token's
    cache slot; k_cache [NB, KVH, D, BS] and v_cache [NB, BS, KVH, D] are contiguous. Rotated k
    and v are written into the caches. Slots outside the cache are an error, not a stray write."""

    def __init__(self, fn: Callable[..., None], dtype: torch.dtype):
        self._fn = fn
        self.dtype = dtype
        self._blocks = IndexCheck(_KERNEL, "blocks")
        self._offsets = IndexCheck(_KERNEL, "offsets")

    @staticmethod
    def load(dtype: torch.dtype) -> RopeKv | None:
        """The kernel for ``dtype``, or None (no compiler, or a dtype it does not handle)."""
        return _load(dtype)

    @staticmethod
    def supports(head_dim: int) -> bool:
        return head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM

    def __call__(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 blocks: torch.Tensor, offsets: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
        # Hot path (every layer of every step): one expression of attribute reads; on a miss,
        # _explain names the first thing wrong.
        dtype = self.dtype
        try:
            num_blocks, kv_heads, head_dim, block_size = k_cache.shape
            tokens, qk_heads, qk_dim = qk.shape
            ld_qk, head_qk, unit_qk = qk.stride()
            ld_v, head_v, unit_v = v.stride()
            ok = (qk.dtype is dtype and v.dtype is dtype and cos.dtype is dtype and sin.dtype is dtype
                  and k_cache.dtype is dtype and v_cache.dtype is dtype and blocks.dtype is _INT64
                  and offsets.dtype is _INT64 and qk.is_cpu and v.is_cpu and cos.is_cpu and sin.is_cpu
                  and blocks.is_cpu and offsets.is_cpu and k_cache.is_cpu and v_cache.is_cpu
                  and qk_dim == head_dim and qk_heads > kv_heads and head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM
                  and unit_qk == 1 and head_qk == head_dim and unit_v == 1 and head_v == head_dim
                  and ld_qk <= INT_MAX and ld_v <= INT_MAX and v.shape == (tokens, kv_heads, head_dim)
                  and cos.shape[0] == tokens and sin.shape[0] == tokens and cos.numel() == tokens * head_dim
                  and sin.numel() == tokens * head_dim and cos.is_contiguous() and sin.is_contiguous()
                  and blocks.shape == (tokens,) and offsets.shape == (tokens,) and blocks.is_contiguous()
                  and offsets.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
                  and v_cache.shape == (num_blocks, block_size, kv_heads, head_dim))
        except (AttributeError, ValueError, IndexError):
            ok = False
        if not ok:
            self._explain(qk, v, cos, sin, blocks, offsets, k_cache, v_cache)
        self._blocks(blocks, 0, num_blocks)
        self._offsets(offsets, 0, block_size)
        heads = qk_heads - kv_heads
        q = torch.empty(tokens, heads, head_dim, dtype=dtype)
        self._fn(qk.data_ptr(), ld_qk, v.data_ptr(), ld_v, cos.data_ptr(), sin.data_ptr(), blocks.data_ptr(),
                 offsets.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tokens, heads, kv_heads,
                 head_dim, block_size, torch.get_num_threads())
        return q

    def _explain(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 blocks: torch.Tensor, offsets: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Raise the error that names what the hot path's check rejected."""
        dtype = self.dtype
        num_blocks, kv_heads, head_dim, block_size = cpu_tensor(_KERNEL, "k_cache", k_cache, dtype, 4)
        tokens, qk_heads, qk_dim = cpu_tensor(_KERNEL, "qk", qk, dtype, 3)
        if qk_heads <= kv_heads or qk_dim != head_dim:
            raise bad(_KERNEL, f"qk has shape {list(qk.shape)}, expected [T, H + {kv_heads}, {head_dim}] "
                               "(KV heads and head_dim of k_cache)")
        if not self.supports(head_dim):
            raise bad(_KERNEL, f"head_dim must be even and <= {MAX_HEAD_DIM}, got {head_dim}")
        ld_qk, head_qk, unit_qk = qk.stride()
        if unit_qk != 1 or head_qk != head_dim or ld_qk > INT_MAX:
            raise bad(_KERNEL, f"qk must have contiguous heads, got strides {qk.stride()}")
        same_shape(_KERNEL, "v", cpu_tensor(_KERNEL, "v", v, dtype, 3), (tokens, kv_heads, head_dim), "[T, KVH, D]")
        ld_v, head_v, unit_v = v.stride()
        if unit_v != 1 or head_v != head_dim or ld_v > INT_MAX:
            raise bad(_KERNEL, f"v must have contiguous heads, got strides {v.stride()}")
        for name, table in (("cos", cos), ("sin", sin)):
            if not isinstance(table, torch.Tensor) or table.dtype is not dtype or not table.is_cpu:
                raise bad(_KERNEL, f"{name} must be a CPU {dtype} tensor, got {_describe(table)}")
            if table.numel() != tokens * head_dim or table.dim() == 0 or table.shape[0] != tokens:
                raise bad(_KERNEL, f"{name} has shape {list(table.shape)}, expected [{tokens}, {head_dim}] values")
            contiguous(_KERNEL, name, table)
        for name, index in (("blocks", blocks), ("offsets", offsets)):
            same_shape(_KERNEL, name, cpu_tensor(_KERNEL, name, index, torch.int64, 1), (tokens,), "one per token")
            contiguous(_KERNEL, name, index)
        contiguous(_KERNEL, "k_cache", k_cache)
        same_shape(_KERNEL, "v_cache", cpu_tensor(_KERNEL, "v_cache", v_cache, dtype, 4),
                   (num_blocks, block_size, kv_heads, head_dim), "[NB, BS, KVH, D] of k_cache's sizes")
        contiguous(_KERNEL, "v_cache", v_cache)
        raise bad(_KERNEL, "arguments rejected")  # unreachable while the two checks agree


def _describe(t: object) -> str:
    return f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


@cache
def _load(dtype: torch.dtype) -> RopeKv | None:
    lib = load_library(_KERNEL)
    if lib is None or dtype not in _SUFFIX:
        return None
    fn = bind(lib, f"rope_kv_{_SUFFIX[dtype]}", [PTR, INT, PTR, INT] + [PTR] * 7 + [INT] * 6)
    return RopeKv(fn, dtype) if fn is not None else None
