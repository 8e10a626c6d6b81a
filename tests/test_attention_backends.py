"""The C kernel against the torch reference backend on random caches: every dtype, the fast
(block 16, head_dim % 64 == 0) and generic paths, windows, GQA, mixed decodes and prompt chunks."""

from __future__ import annotations

import pytest
import torch

from choral.kernels.paged_attention import PagedAttention
from choral.models.attention import (
    AttentionLayout,
    CpuKernelAttention,
    TorchPagedAttention,
    kv_cache_shapes,
    write_kv,
)

pytestmark = pytest.mark.skipif(PagedAttention.load() is None, reason="no C compiler")

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("block_size", "head_dim"), [(16, 64), (16, 128), (8, 64), (16, 32), (5, 16)])
@pytest.mark.parametrize("window", [None, 7])
def test_kernel_matches_torch(dtype: torch.dtype, block_size: int, head_dim: int, window: int | None) -> None:
    check_kernel(dtype, block_size, head_dim, window, heads=6, kv_heads=2)


# The fast path takes a KV head's query heads 4 at a time (a remainder of 1-3), and splits the KV
# heads into runs when their query state passes 16 heads x 256 dims.
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [
    (4, 4, 64), (8, 4, 64), (8, 2, 64), (10, 2, 64), (7, 1, 64), (16, 2, 128), (32, 2, 256), (48, 3, 128),
])
def test_kernel_head_groupings(heads: int, kv_heads: int, head_dim: int) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        check_kernel(dtype, 16, head_dim, None, heads=heads, kv_heads=kv_heads)


# Prompt chunks go through the fast path in tiles of consecutive tokens (2-4 by head grouping),
# each token masking its own window: chunks here start at every offset within a block, and a
# window of 3 makes a tile's second token skip the first token's block (cached 17: limits 18, 19
# see keys from 15 and from 16).
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 3), (8, 4), (6, 2), (8, 2), (10, 2)])
@pytest.mark.parametrize("window", [None, 3, 16, 17])
def test_kernel_prompt_tiles(heads: int, kv_heads: int, window: int | None) -> None:
    seqs = [(17, 8), (15, 33), (0, 7), (40, 1), (31, 2), (1, 19), (64, 5)]
    for dtype in (torch.float32, torch.bfloat16):
        check_kernel(dtype, 16, 64, window, heads=heads, kv_heads=kv_heads, seqs=seqs)


def check_kernel(dtype: torch.dtype, block_size: int, head_dim: int, window: int | None, heads: int,
                 kv_heads: int, seqs: list[tuple[int, int]] | None = None) -> None:
    g = torch.Generator().manual_seed(block_size * 1000 + head_dim + heads)
    num_blocks = 64
    k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.zeros(k_shape, dtype=dtype)
    v_cache = torch.zeros(v_shape, dtype=dtype)
    # Sequences: (tokens already cached, new query tokens): decodes and prompt chunks.
    if seqs is None:
        seqs = [(0, 1), (37, 1), (3, 9), (20, 16), (50, 1), (6, 40)]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, starts, lens, ctx = [], [], [], []
    cursor = 0
    for cached, n in seqs:
        need = -(-(cached + n) // block_size)
        tables.append([perm.pop() for _ in range(need)])
        # Fill every slot this sequence will read with random K/V.
        blocks = torch.tensor([tables[-1][i // block_size] for i in range(cached + n)])
        offsets = torch.tensor([i % block_size for i in range(cached + n)])
        k = torch.randn(cached + n, kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(cached + n, kv_heads, head_dim, generator=g).to(dtype)
        write_kv(k_cache, v_cache, blocks, offsets, k, v)
        starts.append(cursor)
        lens.append(n)
        ctx.append(cached + n)
        cursor += n
    layout = AttentionLayout(starts, lens, ctx, tables, block_size)
    q = torch.randn(cursor, heads, head_dim, generator=g).to(dtype)
    ref_backend = TorchPagedAttention()
    batch = ref_backend.prepare(layout, torch.device("cpu"))
    ref = batch.attend(q, k_cache, v_cache, window, head_dim**-0.5).float()
    compiled = PagedAttention.load()
    assert compiled is not None
    kernel = CpuKernelAttention(compiled, 2)
    got = kernel.prepare(layout, torch.device("cpu")).attend(q, k_cache, v_cache, window, head_dim**-0.5)
    got = got.float()
    assert (got - ref).abs().max().item() <= TOL[dtype]
