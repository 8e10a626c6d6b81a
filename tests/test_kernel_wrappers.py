"""Every C kernel's typed wrapper refuses a wrong dtype, shape, device, memory layout or index with
KernelArgumentError, before any pointer reaches C: the caches and outputs are left untouched.
(The kernels' numerics are tested in test_fused_kernels, test_projection, test_attention_backends.)"""

from __future__ import annotations

import pytest
import torch

from choral.errors import ChoralError, KernelArgumentError
from choral.kernels.paged_attention import PagedAttention
from choral.kernels.rms_norm import RmsNorm
from choral.kernels.rope_kv import RopeKv
from choral.kernels.silu_mul import SiluMul
from choral.kernels.small_gemm import SmallGemm
from choral.models.attention import kv_cache_shapes

F32, BF16 = torch.float32, torch.bfloat16


def kernel(found):  # type: ignore[no-untyped-def]
    if found is None:
        pytest.skip("no C compiler: the kernels are unavailable")
    return found


def meta(*shape: int, dtype: torch.dtype = F32) -> torch.Tensor:
    """A tensor on another device (no data): what a CUDA tensor would be to the kernels."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_the_error_is_ours() -> None:
    assert issubclass(KernelArgumentError, ChoralError) and issubclass(KernelArgumentError, ValueError)


# ---- rms_norm ----------------------------------------------------------------------------------
def test_rms_norm_checks() -> None:
    norm = kernel(RmsNorm.load(F32))
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(norm(x, w, 1e-5), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    cases = [
        ((x.double(), w), "x must be torch.float32, got torch.float64"),
        ((x, w.to(BF16)), "weight must be torch.float32, got torch.bfloat16"),
        ((x.view(3, 2, 4), w), r"x must have 2 dims, got shape \[3, 2, 4\]"),
        ((torch.randn(8, 3).t(), torch.randn(8)[:3]), "x must have unit-stride rows"),
        ((x, torch.randn(9)), "weight has 9 values, x rows have 8"),
        ((x, torch.randn(16)[::2]), "weight must be contiguous"),
        ((meta(3, 8), w), "x must be on the CPU, got meta"),
        ((None, w), "x must be a torch.Tensor, got NoneType"),
    ]
    for (a, b), message in cases:
        with pytest.raises(KernelArgumentError, match=f"^rms_norm: {message}"):
            norm(a, b, 1e-5)


def test_rms_norm_takes_a_row_slice_as_is() -> None:
    norm = kernel(RmsNorm.load(BF16))
    wide = torch.randn(4, 20).to(BF16)
    w = torch.randn(12).to(BF16)
    assert torch.equal(norm(wide[:, 3:15], w, 1e-6), norm(wide[:, 3:15].contiguous(), w, 1e-6))


def test_kernels_for_other_dtypes_are_absent_not_wrong() -> None:
    kernel(RmsNorm.load(F32))
    assert RmsNorm.load(torch.float16) is None and SiluMul.load(torch.float64) is None
    assert RopeKv.load(torch.float16) is None and SmallGemm.load(torch.float16) is None


# ---- silu_mul ----------------------------------------------------------------------------------
def test_silu_mul_checks() -> None:
    act = kernel(SiluMul.load(F32))
    gate_up = torch.randn(2, 10)
    torch.testing.assert_close(act(gate_up), torch.nn.functional.silu(gate_up[:, :5]) * gate_up[:, 5:])
    cases = [
        (gate_up.to(BF16), "gate_up must be torch.float32"),
        (gate_up[:, :9], "gate_up must have an even number of columns"),
        (gate_up.t(), "gate_up must have unit-stride rows"),
        (gate_up.view(2, 2, 5), "gate_up must have 2 dims"),
        (meta(2, 10), "gate_up must be on the CPU"),
    ]
    for bad, message in cases:
        with pytest.raises(KernelArgumentError, match=f"^silu_mul: {message}"):
            act(bad)


# ---- rope_kv -----------------------------------------------------------------------------------
def rope_args(tokens: int = 3, heads: int = 4, kv_heads: int = 2, dim: int = 8, block_size: int = 4,
              num_blocks: int = 5) -> dict[str, torch.Tensor]:
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(tokens, 1, dim)
    k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, kv_heads, dim)
    return dict(
        qk=qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim),
        v=qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim),
        cos=angles.cos(), sin=angles.sin(),
        blocks=torch.tensor([0, 4, 2][:tokens]), offsets=torch.tensor([3, 0, 1][:tokens]),
        k_cache=torch.zeros(k_shape), v_cache=torch.zeros(v_shape),
    )


@pytest.mark.parametrize(("change", "message"), [
    (dict(qk=torch.randn(3, 6, 8).double()), "qk must be torch.float32"),
    (dict(qk=torch.randn(3, 2, 8)), r"qk has shape \[3, 2, 8\], expected \[T, H \+ 2, 8\]"),
    (dict(qk=torch.randn(3, 6, 10)), r"qk has shape \[3, 6, 10\]"),
    (dict(qk=torch.randn(3, 8, 6).transpose(1, 2)), r"qk has shape|qk must have contiguous heads"),
    (dict(qk=torch.randn(6, 3, 8).transpose(0, 1)), "qk must have contiguous heads"),
    (dict(v=torch.randn(3, 3, 8)), r"v has shape \[3, 3, 8\], expected \[3, 2, 8\]"),
    (dict(v=torch.randn(3, 8, 2).transpose(1, 2)), "v must have contiguous heads"),
    (dict(cos=torch.randn(3, 1, 4)), r"cos has shape \[3, 1, 4\]"),
    (dict(sin=torch.randn(3, 1, 8).to(BF16)), "sin must be a CPU torch.float32 tensor"),
    (dict(sin=torch.randn(3, 1, 16)[..., ::2]), "sin must be contiguous"),
    (dict(blocks=torch.tensor([0, 4, 2], dtype=torch.int32)), "blocks must be torch.int64"),
    (dict(blocks=torch.tensor([0, 4])), r"blocks has shape \[2\], expected \[3\]"),
    (dict(blocks=torch.tensor([0, 5, 2])), r"blocks holds 5, outside \[0, 5\)"),
    (dict(blocks=torch.tensor([0, -1, 2])), r"blocks holds -1, outside \[0, 5\)"),
    (dict(offsets=torch.tensor([3, 4, 0])), r"offsets holds 4, outside \[0, 4\)"),
    (dict(offsets=torch.tensor([0, 1, 2, 3, 4, 5])[::2]), "offsets must be contiguous"),
    (dict(k_cache=torch.zeros(5, 2, 4, 8).transpose(2, 3)), "k_cache must be contiguous"),
    (dict(v_cache=torch.zeros(5, 4, 2, 6)), r"v_cache has shape \[5, 4, 2, 6\], expected \[5, 4, 2, 8\]"),
    (dict(v_cache=torch.zeros(5, 4, 2, 8).to(BF16)), "v_cache must be torch.float32"),
    (dict(k_cache=meta(5, 2, 8, 4)), "k_cache must be on the CPU"),
])
def test_rope_kv_checks_and_writes_nothing(change: dict[str, torch.Tensor], message: str) -> None:
    rope_kv = kernel(RopeKv.load(F32))
    args = rope_args()
    caches = (args["k_cache"], args["v_cache"])
    args.update(change)
    with pytest.raises(KernelArgumentError, match=f"^rope_kv: ({message})"):
        rope_kv(**args)
    assert not caches[0].any() and not caches[1].any()


def test_rope_kv_head_dim_limit() -> None:
    rope_kv = kernel(RopeKv.load(F32))
    assert RopeKv.supports(512) and not RopeKv.supports(514) and not RopeKv.supports(63)
    with pytest.raises(KernelArgumentError, match="head_dim must be even and <= 512, got 7"):
        rope_kv(**rope_args(dim=7))


def test_rope_kv_rechecks_an_index_tensor_written_in_place() -> None:
    """The block ids are checked once per tensor (not per layer), and again after an in-place write."""
    rope_kv = kernel(RopeKv.load(F32))
    args = rope_args()
    rope_kv(**args)
    rope_kv(**args)  # the same tensors: remembered as checked
    args["blocks"][1] = 99
    with pytest.raises(KernelArgumentError, match=r"blocks holds 99, outside \[0, 5\)"):
        rope_kv(**args)
    with torch.inference_mode():  # inference tensors have no version counter: checked every call
        blocks = torch.tensor([0, 1, 2])
        rope_kv(**{**args, "blocks": blocks})
        blocks[0] = 7
        with pytest.raises(KernelArgumentError, match="blocks holds 7"):
            rope_kv(**{**args, "blocks": blocks})


# ---- paged_attention ---------------------------------------------------------------------------
def attention_args(dtype: torch.dtype = F32) -> dict[str, object]:
    """Two sequences (a 2-token chunk over 6 cached, a decode over 3) on a 4-block cache of block 4."""
    k_shape, v_shape = kv_cache_shapes(4, 4, 2, 8)
    return dict(
        q=torch.randn(3, 4, 8).to(dtype),
        k_cache=torch.randn(k_shape).to(dtype), v_cache=torch.randn(v_shape).to(dtype),
        block_tables=torch.tensor([[2, 0], [3, 0]], dtype=torch.int32),
        tok_seq=torch.tensor([0, 0, 1], dtype=torch.int32), tok_limit=torch.tensor([5, 6, 3], dtype=torch.int32),
        window=0, scale=0.35, num_threads=1,
    )


@pytest.mark.parametrize(("change", "message"), [
    (dict(q=torch.randn(3, 4, 8).double()), r"q must be one of \[torch.float32, torch.bfloat16, torch.float16\]"),
    (dict(q=torch.randn(3, 8, 4).transpose(1, 2)), "q must be contiguous"),
    (dict(q=torch.randn(3, 32)), "q must have 3 dims"),
    (dict(q=torch.randn(3, 4, 16)), "k_cache has head_dim 8, q has 16"),
    (dict(q=torch.randn(3, 3, 8)), "3 query heads over 2 KV heads"),
    (dict(q=torch.randn(3, 34, 8)), "34 query heads over 2 KV heads.*at most 16 query heads per KV head"),
    (dict(k_cache=torch.randn(4, 2, 8, 4).to(BF16)), "k_cache must be torch.float32"),
    (dict(k_cache=torch.randn(4, 2, 4, 8).transpose(2, 3)), "k_cache must be contiguous"),
    (dict(v_cache=torch.randn(5, 4, 2, 8)), r"v_cache has shape \[5, 4, 2, 8\], expected \[4, 4, 2, 8\]"),
    (dict(v_cache=meta(4, 4, 2, 8)), "v_cache must be on the CPU"),
    (dict(block_tables=torch.tensor([[2, 0], [3, 0]])), "block_tables must be torch.int32, got torch.int64"),
    (dict(block_tables=torch.tensor([[2, 0], [4, 0]], dtype=torch.int32)), r"block_tables holds 4, outside \[0, 4\)"),
    (dict(block_tables=torch.tensor([[2, 0], [3, 0]], dtype=torch.int32).t()), "block_tables must be contiguous"),
    (dict(tok_seq=torch.tensor([0, 0, 2], dtype=torch.int32)), r"tok_seq holds 2, outside \[0, 2\)"),
    (dict(tok_seq=torch.tensor([0, 1], dtype=torch.int32)), r"tok_seq has shape \[2\], expected \[3\]"),
    (dict(tok_limit=torch.tensor([5, 9, 3], dtype=torch.int32)), r"tok_limit holds 9, outside \[1, 9\)"),
    (dict(tok_limit=torch.tensor([0, 6, 3], dtype=torch.int32)), r"tok_limit holds 0, outside \[1, 9\)"),
    (dict(tok_limit=torch.tensor([5, 6, 3])), "tok_limit must be torch.int32"),
    (dict(window=-1), "window must be >= 0"),
    (dict(num_threads=0), "window must be >= 0 and num_threads >= 1, got 0 and 0"),
])
def test_paged_attention_checks(change: dict[str, object], message: str) -> None:
    attend = kernel(PagedAttention.load())
    args = attention_args()
    assert attend(**args).shape == (3, 4, 8)  # type: ignore[arg-type]
    args.update(change)
    with pytest.raises(KernelArgumentError, match=f"^paged_attention: {message}"):
        attend(**args)  # type: ignore[arg-type]


def test_paged_attention_mixed_dtypes_and_empty_batch() -> None:
    attend = kernel(PagedAttention.load())
    args = attention_args(BF16)
    assert attend(**args).dtype == BF16  # type: ignore[arg-type]
    args["v_cache"] = args["v_cache"].half()  # type: ignore[union-attr]
    with pytest.raises(KernelArgumentError, match="v_cache must be torch.bfloat16, got torch.float16"):
        attend(**args)  # type: ignore[arg-type]
    empty = attention_args()
    empty.update(q=torch.randn(0, 4, 8), tok_seq=torch.zeros(0, dtype=torch.int32),
                 tok_limit=torch.zeros(0, dtype=torch.int32), block_tables=torch.zeros(0, 1, dtype=torch.int32))
    assert attend(**empty).shape == (0, 4, 8)  # type: ignore[arg-type]


def test_paged_attention_rechecks_tables_written_in_place() -> None:
    attend = kernel(PagedAttention.load())
    args = attention_args()
    attend(**args)  # type: ignore[arg-type]
    tables = args["block_tables"]
    assert isinstance(tables, torch.Tensor)
    tables[1, 1] = 1000  # a padding slot pointing far outside the cache
    with pytest.raises(KernelArgumentError, match="block_tables holds 1000"):
        attend(**args)  # type: ignore[arg-type]


def test_paged_attention_limits_come_from_the_compiled_kernel() -> None:
    attend = kernel(PagedAttention.load())
    assert (attend.limits.max_group, attend.limits.max_head_dim, attend.limits.max_block_size) == (16, 256, 256)
    assert attend.supports(32, 2, 256, 256) and not attend.supports(34, 2, 64, 16)
    assert not attend.supports(8, 2, 264, 16) and not attend.supports(8, 2, 64, 272)


# ---- small_gemm --------------------------------------------------------------------------------
def test_small_gemm_checks() -> None:
    gemm = kernel(SmallGemm.load(F32))
    w, b = torch.randn(40, 12), torch.randn(40)
    packed = gemm.pack(w, b)
    x = torch.randn(3, 12)
    torch.testing.assert_close(gemm(x, packed), x @ w.t() + b, rtol=1e-5, atol=1e-5)
    cases = [
        (x.to(BF16), "x must be torch.float32, got torch.bfloat16"),
        (torch.randn(3, 13), "x has 13 columns, the weight takes 12"),
        (torch.randn(12, 3).t(), "x must have unit-stride rows"),
        (x.view(3, 3, 4), "x must have 2 dims"),
        (meta(3, 12), "x must be on the CPU"),
    ]
    for bad, message in cases:
        with pytest.raises(KernelArgumentError, match=f"^small_gemm: {message}"):
            gemm(bad, packed)
    with pytest.raises(KernelArgumentError, match="weight must be torch.float32, got torch.bfloat16"):
        gemm.pack(w.to(BF16), None)
    with pytest.raises(KernelArgumentError, match="bias has 39 values, weight has 40 rows"):
        gemm.pack(w, b[:39])
    with pytest.raises(KernelArgumentError, match="both sizes must be positive"):
        gemm.pack(torch.randn(0, 12), None)
    bf16 = SmallGemm.load(BF16)
    if bf16 is not None:
        with pytest.raises(KernelArgumentError, match="packed as torch.bfloat16, this kernel runs torch.float32"):
            gemm(x, bf16.pack(w.to(BF16), None))
