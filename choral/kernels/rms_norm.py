"""Typed wrapper of ``rms_norm.c``: RMSNorm of [T, H] rows in one pass (fp32 or bf16, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from choral.kernels.build import load_library
from choral.kernels.checks import FLOAT, INT, INT_MAX, PTR, bad, bind, contiguous, cpu_tensor

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_KERNEL = "rms_norm"


class RmsNorm:
    """``norm(x, weight, eps)``: x [T, H] with unit-stride rows (any row stride, so a slice of a
    wider tensor goes in as is), weight [H] contiguous, both ``dtype`` on the CPU -> a new
    contiguous [T, H]. Same math as HF's LlamaRMSNorm (``rms_norm.c`` says how it rounds)."""

    def __init__(self, fn: Callable[..., None], dtype: torch.dtype):
        self._fn = fn
        self.dtype = dtype

    @staticmethod
    def load(dtype: torch.dtype) -> RmsNorm | None:
        """The kernel for ``dtype``, or None (no compiler, or a dtype it does not handle)."""
        return _load(dtype)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = self.dtype
        rows, hidden = cpu_tensor(_KERNEL, "x", x, dtype, 2)
        ld, unit = x.stride()
        if unit != 1 or ld > INT_MAX:
            raise bad(_KERNEL, f"x must have unit-stride rows, got strides {(ld, unit)}")
        (width,) = cpu_tensor(_KERNEL, "weight", weight, dtype, 1)
        if width != hidden:
            raise bad(_KERNEL, f"weight has {width} values, x rows have {hidden}")
        contiguous(_KERNEL, "weight", weight)
        out = torch.empty(rows, hidden, dtype=dtype)
        self._fn(x.data_ptr(), ld, weight.data_ptr(), out.data_ptr(), rows, hidden,
                 eps, torch.get_num_threads())
        return out


@cache
def _load(dtype: torch.dtype) -> RmsNorm | None:
    lib = load_library(_KERNEL)
    if lib is None or dtype not in _SUFFIX:
        return None
    fn = bind(lib, f"rms_norm_{_SUFFIX[dtype]}", [PTR, INT, PTR, PTR, INT, INT, FLOAT, INT])
    return RmsNorm(fn, dtype) if fn is not None else None
