"""The fused C kernels next to the model's torch ops: RMSNorm (rms_norm.c) against HF's
LlamaRMSNorm formula, RoPE + KV-cache store (rope_kv.c) against apply_rotary + write_kv, and
SiLU(gate) * up (silu_mul.c) against F.silu and a product. In bf16 they must give the torch
path's bits (RMSNorm and SiLU: up to a last-bit difference in fp32 that can move a rounding),
since they round where torch rounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from choral.kernels.rms_norm import RmsNorm
from choral.kernels.rope_kv import RopeKv
from choral.kernels.silu_mul import SiluMul
from choral.models.attention import write_kv
from choral.models.rope import apply_rotary


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, written out."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 70])  # 70 crosses the kernel's multi-thread threshold
def test_rms_norm_matches_hf(dtype: torch.dtype, rows: int) -> None:
    norm = RmsNorm.load(dtype)
    if norm is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(rows)
    wide = (torch.randn(rows, 100, generator=g) * 3).to(dtype)
    x = wide[:, 4:94]  # row-strided input, as the model hands slices around
    weight = torch.randn(90, generator=g).to(dtype)
    out = norm(x, weight, 1e-5)
    expected = hf_rms_norm(x, weight, 1e-5)
    if dtype == torch.bfloat16:
        # 1/sqrt vs rsqrt may differ in fp32's last bit, which can move a bf16 rounding by one ulp.
        diff = (out.float() - expected.float()).abs()
        assert (diff <= expected.float().abs() * 2.0**-7).all()
        assert (out == expected).float().mean() > 0.99
    else:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 66])
def test_rope_kv_matches_torch_ops(dtype: torch.dtype, tokens: int) -> None:
    rope_kv = RopeKv.load(dtype)
    if rope_kv is None:
        pytest.skip("no C compiler")
    heads, kv_heads, dim, block_size, num_blocks = 6, 2, 32, 16, 12
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    angles = torch.rand(tokens, 1, dim, generator=g) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    blocks, offsets = slots // block_size, slots % block_size

    k_ref = torch.zeros(num_blocks, kv_heads, dim, block_size, dtype=dtype)
    v_ref = torch.zeros(num_blocks, block_size, kv_heads, dim, dtype=dtype)
    rotated = apply_rotary(qk, cos, sin)
    write_kv(k_ref, v_ref, blocks, offsets, rotated[:, heads:], v)

    k_cache, v_cache = torch.zeros_like(k_ref), torch.zeros_like(v_ref)
    q = rope_kv(qk, v, cos, sin, blocks, offsets, k_cache, v_cache)
    if dtype == torch.bfloat16:
        assert torch.equal(q, rotated[:, :heads]) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    else:
        torch.testing.assert_close(q, rotated[:, :heads], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k_cache, k_ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 8), (3, 37), (70, 1536)])  # 37: a partial vector; 70 x 1536: threads
def test_silu_mul_matches_torch(dtype: torch.dtype, rows: int, inter: int) -> None:
    silu_mul = SiluMul.load(dtype)
    if silu_mul is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(rows * 10 + inter)
    wide = torch.randn(rows, 2 * inter + 5, generator=g) * 6
    wide[0, :4] = torch.tensor([-200.0, -88.5, 90.0, 0.0])  # past exp's range both ways, and 0
    gate_up = wide.to(dtype)[:, : 2 * inter]  # row-strided, as a view of a wider tensor
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = silu_mul(gate_up)
    if dtype == torch.bfloat16:
        # exp's last fp32 bit can differ from torch's, which can move a bf16 rounding by one ulp.
        diff = (out.float() - expected.float()).abs()
        assert (diff <= expected.float().abs() * 2.0**-7 + 1e-30).all()
        assert (out == expected).float().mean() > 0.99
    else:
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-30)
