"""Quantized-weight kernels against the gguf package's own dequantization.

Reference: W_ref = gguf.quants.dequantize(blocks) (fp32), y_ref = x @ W_ref^T in float64.

Tolerance of the integer path, derived: x is quantized per block b of 32 to a_k = s_b * round(x_k
/ s_b) with s_b = max|x_b| / 127, so |x_k - a_k| <= s_b / 2 (no clamping: |x_k / s_b| <= 127).
Then |y_n - y_ref_n| <= sum_b (s_b / 2) * sum_{k in b} |W_nk| (the activation error, worst case)
plus fp32 rounding of the K-term accumulations, bounded by 2 K u sum_k |W_nk| |x_k| (u = 2^-24,
with both sides' sums and the scale products). The test asserts that bound, element by element, and
a much tighter one that removes the activation error: y against the quantized activations'
own product (a @ W_ref^T) within the rounding term alone. The fp32 panel path (large batches)
has no activation error: it must be within the rounding term of y_ref.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from choral.errors import QuantKernelError, UnsupportedTensorTypeError
from choral.quant import kernels as qk
from choral.quant.linear import INT8_MAX_TOKENS, QuantEmbedding, QuantProjection
from choral.quant.repack import GGUF_TYPES, PackedRows, repack

pytestmark = pytest.mark.skipif(not qk.kernel_available(), reason="no C compiler for the quant kernel")

U = 2.0**-24
SIMPLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the gguf package quantizes these
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]  # built from random blocks (any bytes are a valid block)


def _gguf_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """GGUF bytes of a [rows, cols] tensor of ``type_name``: quantized random weights for the types
    the gguf package quantizes; random K-quant super-blocks (scales, mins, quants all random, the
    fp16 super-scales set to plausible magnitudes) for the others."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if type_name in SIMPLE:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        w[:, :32] += 0.2  # one block with an offset, so Q4_1/Q5_1 minimums are not ~symmetric
        return quantize(w, GGMLQuantizationType[type_name])
    per_block, block_bytes, _ = GGUF_TYPES[type_name]
    n = rows * cols // per_block
    blocks = rng.integers(0, 256, (n, block_bytes), dtype=np.uint8)

    def f16(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)

    if type_name == "Q6_K":
        blocks[:, 208:210] = f16(1e-4, 1e-3)  # d (the int8 sub-scales are random, signed)
    else:
        blocks[:, 0:2] = f16(1e-4, 1e-3)  # d
        blocks[:, 2:4] = f16(1e-4, 1e-3)  # dmin
    return blocks.reshape(rows, -1)


def _reference(raw: np.ndarray, type_name: str, rows: int, cols: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())


def _case(type_name: str, rows: int, cols: int, seed: int = 0) -> tuple[PackedRows, torch.Tensor]:
    rng = np.random.default_rng(seed)
    raw = _gguf_blocks(type_name, rows, cols, rng)
    return repack(raw, type_name, rows, cols), _reference(raw, type_name, rows, cols)


def _cols(type_name: str) -> int:
    # Odd numbers of 32-blocks (tails of every vector loop) where the format allows it.
    return 768 if type_name in K_QUANTS else 224


def _int8_bounds(x: torch.Tensor, w: torch.Tensor, acts: qk.QuantActivations) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation-error bound + rounding bound, rounding bound) per output, [T, N] float64."""
    k = x.shape[1]
    xd, wd = x.double(), w.double()
    scale = acts.scale.double()  # [T, K / 32]
    w_abs_blocks = wd.abs().reshape(w.shape[0], k // 32, 32).sum(-1)  # [N, K / 32]
    act_err = 0.5 * scale @ w_abs_blocks.t()
    rounding = 2 * k * U * (xd.abs() @ wd.abs().t()) + 1e-7
    return act_err + rounding, rounding


@pytest.mark.parametrize("type_name", SIMPLE + K_QUANTS)
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 200])
def test_integer_matmul_matches_gguf_dequantization(type_name: str, num_tokens: int) -> None:
    rows, cols = 37, _cols(type_name)
    packed, w_ref = _case(type_name, rows, cols)
    x = torch.randn(num_tokens, cols, generator=torch.Generator().manual_seed(num_tokens))
    x[:, 5] *= 20  # an outlier: its block's activation scale is coarse, the bound follows it
    acts = qk.quantize_activations(x)
    y = torch.empty(num_tokens, rows)
    qk.packed_matmul(packed.kind, torch.from_numpy(packed.data), cols, acts, y)
    y_ref = x.double() @ w_ref.double().t()
    full, rounding = _int8_bounds(x, w_ref, acts)
    assert ((y.double() - y_ref).abs() <= full).all()
    a = acts.q.double() * acts.scale.double().repeat_interleave(32, dim=1)  # the quantized activations
    assert ((y.double() - a @ w_ref.double().t()).abs() <= rounding).all()


@pytest.mark.parametrize("type_name", SIMPLE + K_QUANTS)
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 200])
def test_projection_matches_gguf_dequantization(type_name: str, num_tokens: int) -> None:
    """QuantProjection picks the regime by batch size: integer dots up to INT8_MAX_TOKENS rows,
    dequantized panels + fp32 GEMM above (no activation error there)."""
    rows, cols = 45, _cols(type_name)
    packed, w_ref = _case(type_name, rows, cols, seed=1)
    bias = torch.randn(rows)
    proj = QuantProjection([packed], bias)
    x = torch.randn(num_tokens, cols, generator=torch.Generator().manual_seed(7))
    y = proj(x)
    y_ref = x.double() @ w_ref.double().t() + bias.double()
    if num_tokens <= INT8_MAX_TOKENS:
        acts = qk.quantize_activations(x)
        bound, _ = _int8_bounds(x, w_ref, acts)
        two_calls = torch.empty(num_tokens, rows)
        qk.packed_matmul(packed.kind, torch.from_numpy(packed.data), cols, acts, two_calls, bias)
        assert torch.equal(y, two_calls)  # quant_linear = quant_act_q8 + quant_matmul, exactly
    else:
        bound = 4 * cols * U * (x.double().abs() @ w_ref.double().abs().t()) + 1e-6
    assert ((y.double() - y_ref).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("type_name", SIMPLE + K_QUANTS)
def test_scalar_and_simd_paths_agree(type_name: str) -> None:
    """The scalar build keeps the AVX2 build's lanes and order: bit-identical there. (An AVX-512
    build sums in 16 lanes: equal to fp32 rounding.)"""
    rows, cols = 29, _cols(type_name)
    packed, _ = _case(type_name, rows, cols, seed=2)
    weight = torch.from_numpy(packed.data)
    x = torch.randn(9, cols, generator=torch.Generator().manual_seed(3))
    outs = []
    for scalar in (False, True):
        acts = qk.quantize_activations(x, scalar=scalar)
        y = torch.empty(9, rows)
        qk.packed_matmul(packed.kind, weight, cols, acts, y, scalar=scalar)
        outs.append(y)
    assert qk.simd_path(scalar=True) == "scalar"
    if qk.simd_path().startswith("avx2"):
        assert torch.equal(outs[0], outs[1])
    else:
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    dense = [qk.dequantize_rows(packed.kind, weight, cols, range(rows), scalar=s) for s in (False, True)]
    assert torch.equal(dense[0], dense[1])


@pytest.mark.parametrize("type_name", SIMPLE + K_QUANTS)
def test_dequantized_rows_equal_gguf(type_name: str) -> None:
    rows, cols = 40, _cols(type_name)
    packed, w_ref = _case(type_name, rows, cols, seed=4)
    weight = torch.from_numpy(packed.data)
    # One fp32 rounding of scale * q + offset, where gguf may round twice (scale * q, then + offset).
    tol = dict(rtol=2 * U, atol=4 * U * float(w_ref.abs().max()))
    torch.testing.assert_close(qk.dequantize_rows(packed.kind, weight, cols, range(3, 17)), w_ref[3:17], **tol)
    ids = torch.tensor([5, 0, 39, 5], dtype=torch.int64)
    emb = QuantEmbedding(packed)
    torch.testing.assert_close(emb.lookup(ids), w_ref[ids], **tol)


def test_fused_groups_of_different_kinds_write_their_own_columns() -> None:
    q4k, w1 = _case("Q4_K", 20, 256, seed=5)
    q6k, w2 = _case("Q6_K", 12, 256, seed=6)
    q8, w3 = _case("Q8_0", 8, 256, seed=7)
    proj = QuantProjection([q4k, q6k, q8], None)
    w_ref = torch.cat([w1, w2, w3])
    for num_tokens in (3, INT8_MAX_TOKENS + 5):
        x = torch.randn(num_tokens, 256, generator=torch.Generator().manual_seed(num_tokens))
        y = proj(x)
        bound, _ = _int8_bounds(x, w_ref, qk.quantize_activations(x))
        assert ((y.double() - x.double() @ w_ref.double().t()).abs() <= bound + 1e-6).all()
    assert proj.formats == ["Q4_K", "Q6_K", "Q8_0"] and proj.out_features == 40


def test_wrappers_reject_bad_tensors() -> None:
    packed, _ = _case("Q4_0", 8, 64)
    weight = torch.from_numpy(packed.data)
    x = torch.randn(2, 64)
    acts = qk.quantize_activations(x)
    with pytest.raises(QuantKernelError, match="float32"):
        qk.quantize_activations(x.double())
    with pytest.raises(QuantKernelError, match="multiple of 32"):
        qk.quantize_activations(torch.randn(2, 40))
    with pytest.raises(QuantKernelError, match="contiguous"):
        qk.quantize_activations(torch.randn(64, 2).t())
    with pytest.raises(QuantKernelError, match="shapes"):
        qk.packed_matmul(packed.kind, weight, 64, acts, torch.empty(3, 8))
    with pytest.raises(QuantKernelError, match="columns"):
        qk.packed_matmul(packed.kind, weight, 96, acts, torch.empty(2, 8))
    with pytest.raises(QuantKernelError, match="kind"):
        qk.packed_matmul(9, weight, 64, acts, torch.empty(2, 8))
    with pytest.raises(QuantKernelError, match="out of range"):
        qk.dequantize_rows(packed.kind, weight, 64, torch.tensor([8]))
    with pytest.raises(QuantKernelError, match="range"):
        qk.dequantize_rows(packed.kind, weight, 64, range(0, 9))
    with pytest.raises(UnsupportedTensorTypeError, match="Q2_K"):
        repack(np.zeros((1, 84), np.uint8), "Q2_K", 1, 256)
    with pytest.raises(UnsupportedTensorTypeError, match="blocks"):
        repack(np.zeros((1, 18), np.uint8), "Q4_0", 1, 48)


@pytest.mark.parametrize("flags", [
    ["-mavx512f", "-mavx512bw", "-mavx512vnni"],  # the AVX-512 VNNI path (Sapphire Rapids, Zen 4)
    ["-mavx2", "-mfma", "-mavxvnni"],  # AVX2 with AVX-VNNI's 256-bit dpbusd (Alder Lake+)
    ["-march=x86-64"],  # no SIMD macros: the scalar path
])
def test_every_path_compiles(flags: list[str], tmp_path: Path) -> None:
    """Only the host's path runs here; the others must at least build where the compiler has them."""
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("no gcc")
    source = Path(qk.__file__).parents[1] / "kernels" / "quant_matmul.c"
    result = subprocess.run([compiler, "-O2", "-fopenmp", "-Wall", "-Werror", *flags, "-c", str(source),
                             "-o", str(tmp_path / "q.o")], capture_output=True, text=True)
    if "unrecognized" in result.stderr:
        pytest.skip(f"this gcc lacks {flags}")
    assert result.returncode == 0, result.stderr
