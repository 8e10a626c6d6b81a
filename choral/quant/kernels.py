"""Typed wrappers around ``quant_matmul.c``: dtype, shape and contiguity are checked here, before
any pointer crosses into C."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from choral.errors import QuantKernelError
from choral.kernels.build import load_library
from choral.quant.repack import BLOCK_BYTES

_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
# C function -> (argument types, return type); the int returns are 0 or -1 (out of memory).
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "quant_block_bytes": ([_I], _I),
    "quant_path": ([], _I),
    "quant_act_q8": ([_P, _I, _I, _I, _P, _P, _P, _I], None),
    "quant_matmul": ([_I, _P, _I, _I, _P, _P, _P, _I, _P, _P, _I, _I], _I),
    "quant_linear": ([_I, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I], _I),
    "quant_dequant_rows": ([_I, _P, _I, _P, _I, _I64, _P, _I], _I),
}


@cache
def _library(scalar: bool) -> ctypes.CDLL | None:
    """``quant_matmul.c`` (or its scalar twin) with every signature set, or None."""
    lib = load_library("quant_matmul_scalar" if scalar else "quant_matmul")
    if lib is None:
        return None
    try:
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
    except AttributeError:  # a stale or foreign build
        return None
    return lib


@dataclass(frozen=True)
class QuantActivations:
    """Activations quantized per block of 32 like llama.cpp's Q8_0: ``q`` [T, K] int8, ``scale``
    [T, K / 32] fp32 (block amax / 127) and ``half_sums`` [T, K / 16] (scale * sum of q per 16)."""

    q: torch.Tensor
    scale: torch.Tensor
    half_sums: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.q.shape[0])


def kernel_library(scalar: bool = False) -> ctypes.CDLL:
    """The compiled kernel (``scalar=True``: the portable path only). Raises if it cannot compile."""
    lib = _library(scalar)
    if lib is None:
        raise QuantKernelError("the quantized-weight kernel (quant_matmul.c) did not compile here "
                               "(no C compiler, or CHORAL_NO_KERNELS=1); use weights='dequantize'")
    return lib


def kernel_available() -> bool:
    """Whether native quantized weights can run here (the kernel compiles)."""
    return _library(False) is not None


def simd_path(scalar: bool = False) -> str:
    """Which code path the build runs: scalar, avx2, avx2+avxvnni or avx512vnni."""
    return ("scalar", "avx2", "avx2+avxvnni", "avx512vnni")[kernel_library(scalar).quant_path()]


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, dims: int) -> None:
    if t.dtype != dtype or t.dim() != dims or t.device.type != "cpu":
        raise QuantKernelError(f"{name}: expected a {dims}-d {dtype} CPU tensor, got {t.dim()}-d {t.dtype} "
                               f"on {t.device}")
    if t.stride(-1) != 1:
        raise QuantKernelError(f"{name}: rows must be contiguous (stride {t.stride()})")


def quantize_activations(x: torch.Tensor, *, scalar: bool = False) -> QuantActivations:
    """x [T, K] fp32 (rows contiguous, any row stride; K a multiple of 32) -> QuantActivations."""
    _check(x, "x", torch.float32, 2)
    num_tokens, k = x.shape
    if k % 32:
        raise QuantKernelError(f"x: {k} columns is not a multiple of 32")
    q = torch.empty(num_tokens, k, dtype=torch.int8)
    scale = torch.empty(num_tokens, k // 32, dtype=torch.float32)
    half_sums = torch.empty(num_tokens, k // 16, dtype=torch.float32)
    kernel_library(scalar).quant_act_q8(x.data_ptr(), x.stride(0), num_tokens, k, q.data_ptr(), scale.data_ptr(),
                                        half_sums.data_ptr(), torch.get_num_threads())
    return QuantActivations(q, scale, half_sums)


def _check_weight(kind: int, weight: torch.Tensor, cols: int) -> None:
    if kind not in BLOCK_BYTES:
        raise QuantKernelError(f"unknown block kind {kind}")
    _check(weight, "weight", torch.uint8, 2)
    if not weight.is_contiguous() or cols % 32 or weight.shape[1] != cols // 32 * BLOCK_BYTES[kind]:
        raise QuantKernelError(f"weight: [{weight.shape[0]}, {weight.shape[1]}] bytes is not {cols} columns "
                               f"of kind {kind} blocks, contiguous")


def packed_matmul(kind: int, weight: torch.Tensor, cols: int, acts: QuantActivations, out: torch.Tensor,
                  bias: torch.Tensor | None = None, *, scalar: bool = False) -> None:
    """out[t, n] = sum_k x[t, k] W[n, k] (+ bias[n]) for the packed ``weight`` [N, bytes] of
    ``cols`` columns. ``out`` [T, N] fp32 may be a column slice of a wider tensor (rows strided)."""
    _check_weight(kind, weight, cols)
    rows = weight.shape[0]
    _check(out, "out", torch.float32, 2)
    if tuple(out.shape) != (acts.num_tokens, rows) or acts.q.shape[1] != cols:
        raise QuantKernelError(f"shapes: x [{acts.num_tokens}, {acts.q.shape[1]}] @ W^T [{cols}, {rows}] "
                               f"-> out {list(out.shape)}")
    if bias is not None:
        _check(bias, "bias", torch.float32, 1)
        if bias.shape[0] != rows:
            raise QuantKernelError(f"bias: {bias.shape[0]} values for {rows} rows")
    status = kernel_library(scalar).quant_matmul(
        kind, weight.data_ptr(), rows, cols, acts.q.data_ptr(), acts.scale.data_ptr(), acts.half_sums.data_ptr(),
        acts.num_tokens, bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0),
        torch.get_num_threads())
    if status != 0:
        raise QuantKernelError("quant_matmul: out of memory for a row buffer")


def packed_linear(kind: int, weight: torch.Tensor, cols: int, x: torch.Tensor, out: torch.Tensor,
                  bias: torch.Tensor | None = None) -> None:
    """``quantize_activations`` then ``packed_matmul`` in one C call (a projection's step):
    x [T, cols] fp32 (rows contiguous) -> out [T, N] fp32 (may be a column slice)."""
    _check_weight(kind, weight, cols)
    _check(x, "x", torch.float32, 2)
    _check(out, "out", torch.float32, 2)
    rows = weight.shape[0]
    if x.shape[1] != cols or tuple(out.shape) != (x.shape[0], rows):
        raise QuantKernelError(f"shapes: x {list(x.shape)} @ W^T [{cols}, {rows}] -> out {list(out.shape)}")
    if bias is not None:
        _check(bias, "bias", torch.float32, 1)
        if bias.shape[0] != rows:
            raise QuantKernelError(f"bias: {bias.shape[0]} values for {rows} rows")
    status = kernel_library().quant_linear(
        kind, weight.data_ptr(), rows, cols, x.data_ptr(), x.stride(0), x.shape[0],
        bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0), torch.get_num_threads())
    if status != 0:
        raise QuantKernelError("quant_linear: out of memory for the activation or row buffers")


def dequantize_rows(kind: int, weight: torch.Tensor, cols: int, rows: torch.Tensor | range, *,
                    scalar: bool = False) -> torch.Tensor:
    """W[rows, :] in fp32, [len(rows), cols]: ``rows`` is an int64 index tensor (gathered, e.g.
    token ids) or a ``range`` with step 1 (a panel)."""
    _check_weight(kind, weight, cols)
    lib = kernel_library(scalar)
    if isinstance(rows, range):
        if rows.step != 1 or rows.start < 0 or rows.stop > weight.shape[0]:
            raise QuantKernelError(f"rows: {rows} is not a step-1 range inside [0, {weight.shape[0]})")
        out = torch.empty(len(rows), cols, dtype=torch.float32)
        status = lib.quant_dequant_rows(kind, weight.data_ptr(), cols, None, len(rows), rows.start, out.data_ptr(),
                                        torch.get_num_threads())
    else:
        if rows.dtype != torch.int64 or rows.dim() != 1 or not rows.is_contiguous():
            raise QuantKernelError(f"rows: expected a contiguous 1-d int64 tensor, got {rows.dtype} {list(rows.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= weight.shape[0]):
            raise QuantKernelError(f"rows: index out of range [0, {weight.shape[0]})")
        out = torch.empty(rows.numel(), cols, dtype=torch.float32)
        status = lib.quant_dequant_rows(kind, weight.data_ptr(), cols, rows.data_ptr(), rows.numel(), 0,
                                        out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise QuantKernelError("quant_dequant_rows: out of memory for a row buffer")
    return out
