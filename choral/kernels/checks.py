"""What every typed kernel wrapper shares: binding a C function's signature, checking a tensor
argument, and checking an index tensor's values once per step.

The checks run on every call, so they are attribute reads and integer compares (a few hundred
nanoseconds each); anything that reads tensor data (an index range) is remembered per tensor.
A failed check raises :class:`KernelArgumentError` naming the kernel and the argument before any
pointer reaches C.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch

from choral.errors import KernelArgumentError

logger = logging.getLogger(__name__)

PTR, INT, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
INT_MAX = 2**31 - 1  # every size and stride crosses into C as an int


def bind(lib: ctypes.CDLL, name: str, argtypes: list[Any]) -> Any | None:
    """``lib.name`` with its argument types set (it returns void), or None when the library lacks
    it (a stale or foreign build: the caller falls back to torch)."""
    try:
        fn = getattr(lib, name)
    except AttributeError:
        logger.warning("choral: kernel library %s has no %s; falling back to torch", lib._name, name)
        return None
    fn.restype = None
    fn.argtypes = argtypes
    return fn


def bad(kernel: str, message: str) -> KernelArgumentError:
    return KernelArgumentError(f"{kernel}: {message}")


def cpu_tensor(kernel: str, name: str, t: torch.Tensor, dtype: torch.dtype, ndim: int) -> torch.Size:
    """``t.shape``, once ``t`` is known to be a CPU tensor of ``dtype`` with ``ndim`` dims."""
    try:
        ok = t.dtype is dtype and t.is_cpu and t.ndim == ndim
    except AttributeError:
        raise bad(kernel, f"{name} must be a torch.Tensor, got {type(t).__name__}") from None
    if not ok:
        if t.dtype is not dtype:
            raise bad(kernel, f"{name} must be {dtype}, got {t.dtype}")
        if not t.is_cpu:
            raise bad(kernel, f"{name} must be on the CPU, got {t.device}")
        raise bad(kernel, f"{name} must have {ndim} dims, got shape {list(t.shape)}")
    return t.shape


def contiguous(kernel: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise bad(kernel, f"{name} must be contiguous, got strides {t.stride()} for shape {list(t.shape)}")


def same_shape(kernel: str, name: str, got: torch.Size, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(got) != expected:
        raise bad(kernel, f"{name} has shape {list(got)}, expected {list(expected)} ({meaning})")


class IndexCheck:
    """Whether an index tensor's values lie in ``[low, high)``. A forward hands the same index
    tensors (block tables, cache slots) to every layer, so the reduction over the values runs once
    per step, not once per layer: the last tensor checked is held (its id cannot be reused while
    held) with its version counter, which every in-place write bumps. Inference-mode tensors have
    no version counter; they are checked on every call."""

    def __init__(self, kernel: str, name: str):
        self.kernel = kernel
        self.name = name
        self._last: tuple[torch.Tensor, int, int, int] | None = None

    def __call__(self, t: torch.Tensor, low: int, high: int) -> None:
        try:
            version = t._version
        except RuntimeError:  # an inference tensor
            version = -1
        last = self._last
        if last is not None and last[0] is t and last[1] == version >= 0 and last[2] == low and last[3] == high:
            return
        if t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t))
            if lo < low or hi >= high:
                value = lo if lo < low else hi
                raise bad(self.kernel, f"{self.name} holds {value}, outside [{low}, {high})")
        self._last = (t, version, low, high)
