"""Typed wrapper of ``silu_mul.c``: SwiGLU's SiLU(gate) * up in one pass (fp32 or bf16, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from choral.kernels.build import load_library
from choral.kernels.checks import INT, INT_MAX, PTR, bad, bind, cpu_tensor

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_KERNEL = "silu_mul"


class SiluMul:
    """``act(gate_up)``: gate_up [T, 2 * I] (gate columns, then up) with unit-stride rows, ``dtype``
    on the CPU -> a new contiguous [T, I] holding silu(gate) * up."""

    def __init__(self, fn: Callable[..., None], dtype: torch.dtype):
        self._fn = fn
        self.dtype = dtype

    @staticmethod
    def load(dtype: torch.dtype) -> SiluMul | None:
        """The kernel for ``dtype``, or None (no compiler, or a dtype it does not handle)."""
        return _load(dtype)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = cpu_tensor(_KERNEL, "gate_up", gate_up, self.dtype, 2)
        ld, unit = gate_up.stride()
        if unit != 1 or ld > INT_MAX:
            raise bad(_KERNEL, f"gate_up must have unit-stride rows, got strides {(ld, unit)}")
        if width % 2:
            raise bad(_KERNEL, f"gate_up must have an even number of columns (gate, then up), got {width}")
        inter = width // 2
        out = torch.empty(rows, inter, dtype=self.dtype)
        self._fn(gate_up.data_ptr(), ld, out.data_ptr(), rows, inter,
                 torch.get_num_threads())
        return out


@cache
def _load(dtype: torch.dtype) -> SiluMul | None:
    lib = load_library(_KERNEL)
    if lib is None or dtype not in _SUFFIX:
        return None
    fn = bind(lib, f"silu_mul_{_SUFFIX[dtype]}", [PTR, INT, PTR, INT, INT, INT])
    return SiluMul(fn, dtype) if fn is not None else None
