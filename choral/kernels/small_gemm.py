"""Typed wrapper of ``small_gemm.c``: y = x W^T (+ b) with W packed once into 32-column panels
(fp32 or bf16 weights, fp32 input, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from choral.kernels.build import load_library
from choral.kernels.checks import INT, INT_MAX, PTR, bad, bind, cpu_tensor

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_KERNEL = "small_gemm"
PANEL = 32  # columns per packed panel (small_gemm.c's PANEL)


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernel's layout, made only by :meth:`SmallGemm.pack` (which checked it)."""

    panels: torch.Tensor  # [ceil(out / 32), in, 32] (bf16: pairs of columns share a 32-bit word)
    bias: torch.Tensor | None  # [out], contiguous
    in_features: int
    out_features: int


class SmallGemm:
    """The panel GEMM for one weight dtype: ``pack(weight, bias)`` once, then ``gemm(x, packed)``
    with x [M, in] fp32 with unit-stride rows -> a new [M, out] in the weight's dtype."""

    def __init__(self, pack_fn: Callable[..., None], gemm_fn: Callable[..., None], dtype: torch.dtype):
        self._pack = pack_fn
        self._gemm = gemm_fn
        self.dtype = dtype

    @staticmethod
    def load(dtype: torch.dtype) -> SmallGemm | None:
        """The kernel for weights of ``dtype``, or None (no compiler, or a dtype it does not handle)."""
        return _load(dtype)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedWeight:
        """weight [out, in] (and bias [out]) of this dtype on the CPU, in the kernel's layout."""
        out_features, in_features = cpu_tensor(_KERNEL, "weight", weight, self.dtype, 2)
        if not 0 < out_features <= INT_MAX or not 0 < in_features <= INT_MAX:
            raise bad(_KERNEL, f"weight has shape {list(weight.shape)}; both sizes must be positive")
        if bias is not None:
            (width,) = cpu_tensor(_KERNEL, "bias", bias, self.dtype, 1)
            if width != out_features:
                raise bad(_KERNEL, f"bias has {width} values, weight has {out_features} rows")
            bias = bias.contiguous()
        w = weight.t().contiguous()  # [in, out]
        panels = torch.empty(-(-out_features // PANEL), in_features, PANEL, dtype=self.dtype)
        self._pack(w.data_ptr(), panels.data_ptr(), in_features, out_features)
        return PackedWeight(panels, bias, in_features, out_features)

    def __call__(self, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        rows, width = cpu_tensor(_KERNEL, "x", x, torch.float32, 2)
        ld, unit = x.stride()
        if unit != 1 or ld > INT_MAX:
            raise bad(_KERNEL, f"x must have unit-stride rows, got strides {(ld, unit)}")
        if width != packed.in_features:
            raise bad(_KERNEL, f"x has {width} columns, the weight takes {packed.in_features}")
        if packed.panels.dtype is not self.dtype:
            raise bad(_KERNEL, f"the weight was packed as {packed.panels.dtype}, this kernel runs {self.dtype}")
        y = torch.empty(rows, packed.out_features, dtype=self.dtype)
        bias = packed.bias
        self._gemm(x.data_ptr(), packed.panels.data_ptr(), bias.data_ptr() if bias is not None else None,
                   y.data_ptr(), rows, width, packed.out_features, ld, torch.get_num_threads())
        return y


@cache
def _load(dtype: torch.dtype) -> SmallGemm | None:
    lib = load_library(_KERNEL)
    if lib is None or dtype not in _SUFFIX:
        return None
    suffix = _SUFFIX[dtype]
    pack = bind(lib, f"small_gemm_pack_{suffix}", [PTR] * 2 + [INT] * 2)
    gemm = bind(lib, f"small_gemm_{suffix}", [PTR] * 4 + [INT] * 5)
    return SmallGemm(pack, gemm, dtype) if pack is not None and gemm is not None else None
