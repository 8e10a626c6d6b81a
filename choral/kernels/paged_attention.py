"""Typed wrapper of ``paged_attention.c``: each query token attends to its sequence's cached keys
and values through the block table (fp32, bf16, fp16; CPU)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from choral.kernels.build import load_library
from choral.kernels.checks import FLOAT, INT, PTR, IndexCheck, bad, bind, contiguous, cpu_tensor, same_shape

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_KERNEL = "paged_attention"
_INT32 = torch.int32


@dataclass(frozen=True)
class Limits:
    """What the compiled kernel handles (its MAX_GROUP, MAX_D, MAX_BLOCK)."""

    max_group: int  # query heads per KV head
    max_head_dim: int
    max_block_size: int


class PagedAttention:
    """``attend(q, k_cache, v_cache, block_tables, tok_seq, tok_limit, window, scale, num_threads)``
    -> out [T, H, D] in q's dtype.

    q [T, H, D], k_cache [NB, KVH, D, BS] (keys transposed inside a block) and v_cache
    [NB, BS, KVH, D] are contiguous, one dtype, on the CPU; block_tables [S, MAXB] int32 lists each
    sequence's blocks (rows padded with any valid id); per query token, tok_seq [T] int32 is its
    row of block_tables and tok_limit [T] int32 how many cached tokens it sees (its cache index +
    1). ``window`` (0: none) limits that to the last ``window`` tokens. Every id and limit is
    checked against the cache once per set of tables, so no value can make the kernel read
    outside the cache."""

    def __init__(self, functions: dict[torch.dtype, Callable[..., None]], limits: Limits):
        self._functions = functions
        self.limits = limits
        self._tables = IndexCheck(_KERNEL, "block_tables")
        self._seqs = IndexCheck(_KERNEL, "tok_seq")
        self._token_limits = IndexCheck(_KERNEL, "tok_limit")

    @staticmethod
    def load() -> PagedAttention | None:
        """The kernel, or None (no compiler)."""
        return _load()

    def supports(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
        lim = self.limits
        return (num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= lim.max_group
                and head_dim <= lim.max_head_dim and block_size <= lim.max_block_size)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 tok_seq: torch.Tensor, tok_limit: torch.Tensor, window: int, scale: float,
                 num_threads: int) -> torch.Tensor:
        # Hot path (every layer of every step): one expression of attribute reads; on a miss,
        # _explain names the first thing wrong.
        fn = self._functions.get(q.dtype) if isinstance(q, torch.Tensor) else None
        try:
            tokens, heads, head_dim = q.shape
            num_blocks, kv_heads, k_dim, block_size = k_cache.shape
            seqs, max_blocks = block_tables.shape
            dtype = q.dtype
            lim = self.limits
            ok = (fn is not None and k_cache.dtype is dtype and v_cache.dtype is dtype
                  and block_tables.dtype is _INT32 and tok_seq.dtype is _INT32 and tok_limit.dtype is _INT32
                  and q.is_cpu and k_cache.is_cpu and v_cache.is_cpu and block_tables.is_cpu and tok_seq.is_cpu
                  and tok_limit.is_cpu and k_dim == head_dim and tok_seq.shape == (tokens,)
                  and tok_limit.shape == (tokens,) and v_cache.shape == (num_blocks, block_size, kv_heads, k_dim)
                  and heads % kv_heads == 0 and heads // kv_heads <= lim.max_group and head_dim <= lim.max_head_dim
                  and block_size <= lim.max_block_size and q.is_contiguous() and k_cache.is_contiguous()
                  and v_cache.is_contiguous() and block_tables.is_contiguous() and tok_seq.is_contiguous()
                  and tok_limit.is_contiguous() and window >= 0 and num_threads >= 1)
        except (AttributeError, ValueError, ZeroDivisionError):
            ok = False
        if not ok:
            self._explain(q, k_cache, v_cache, block_tables, tok_seq, tok_limit, window, num_threads)
        assert fn is not None
        out = torch.empty_like(q)
        if tokens == 0:
            return out
        self._tables(block_tables, 0, num_blocks)
        self._seqs(tok_seq, 0, seqs)
        self._token_limits(tok_limit, 1, max_blocks * block_size + 1)
        fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), max_blocks,
           tok_seq.data_ptr(), tok_limit.data_ptr(), tokens, heads, kv_heads, head_dim, block_size, window, scale,
           out.data_ptr(), num_threads)
        return out

    def _explain(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 tok_seq: torch.Tensor, tok_limit: torch.Tensor, window: int, num_threads: int) -> None:
        """Raise the error that names what the hot path's check rejected."""
        if not isinstance(q, torch.Tensor) or q.dtype not in self._functions:
            got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
            raise bad(_KERNEL, f"q must be one of {list(self._functions)}, got {got}")
        dtype = q.dtype
        tokens, heads, head_dim = cpu_tensor(_KERNEL, "q", q, dtype, 3)
        contiguous(_KERNEL, "q", q)
        num_blocks, kv_heads, k_dim, block_size = cpu_tensor(_KERNEL, "k_cache", k_cache, dtype, 4)
        if k_dim != head_dim:
            raise bad(_KERNEL, f"k_cache has head_dim {k_dim}, q has {head_dim}")
        contiguous(_KERNEL, "k_cache", k_cache)
        same_shape(_KERNEL, "v_cache", cpu_tensor(_KERNEL, "v_cache", v_cache, dtype, 4),
                   (num_blocks, block_size, kv_heads, head_dim), "[NB, BS, KVH, D] of k_cache's sizes")
        contiguous(_KERNEL, "v_cache", v_cache)
        if kv_heads < 1 or not self.supports(heads, kv_heads, head_dim, block_size):
            lim = self.limits
            raise bad(_KERNEL, f"{heads} query heads over {kv_heads} KV heads, head_dim {head_dim}, block size "
                               f"{block_size}: needs a whole number of at most {lim.max_group} query heads per KV "
                               f"head, head_dim <= {lim.max_head_dim}, block size <= {lim.max_block_size}")
        cpu_tensor(_KERNEL, "block_tables", block_tables, _INT32, 2)
        contiguous(_KERNEL, "block_tables", block_tables)
        for name, index in (("tok_seq", tok_seq), ("tok_limit", tok_limit)):
            same_shape(_KERNEL, name, cpu_tensor(_KERNEL, name, index, _INT32, 1), (tokens,), "one per q row")
            contiguous(_KERNEL, name, index)
        if window < 0 or num_threads < 1:
            raise bad(_KERNEL, f"window must be >= 0 and num_threads >= 1, got {window} and {num_threads}")
        raise bad(_KERNEL, "arguments rejected")  # unreachable while the two checks agree


@cache
def _load() -> PagedAttention | None:
    lib = load_library(_KERNEL)
    if lib is None:
        return None
    signature = [PTR] * 4 + [INT, PTR, PTR] + [INT] * 6 + [FLOAT, PTR, INT]
    functions = {dtype: bind(lib, f"paged_attention_{suffix}", signature) for dtype, suffix in _SUFFIX.items()}
    limits_fn = bind(lib, "choral_kernel_limits", [ctypes.POINTER(ctypes.c_int)] * 3)
    if limits_fn is None or any(fn is None for fn in functions.values()):
        return None
    group, dim, block = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    limits_fn(ctypes.byref(group), ctypes.byref(dim), ctypes.byref(block))
    return PagedAttention({d: fn for d, fn in functions.items() if fn is not None},
                          Limits(group.value, dim.value, block.value))
