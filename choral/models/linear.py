"""Projections (y = x W^T + b) with the weight stored the way the device's GEMM likes it.

- Panel-packed (CPU fp32, when ``choral/kernels/small_gemm.c`` compiles): the weight packed once
  into 32-column panels for our own GEMM. MKL re-packs the weight on every call, which at decode
  batch sizes moves the weights through memory more than once per step (measured on SmolLM2's
  projections at batch 32 with cold weights, 2 threads: 64 -> 44 ms per step; batch 8: 49 -> 28).
- Dense: the weight kept transposed, [in, out], so ``x @ w`` reads it row-major; MKL runs that
  faster than F.linear's transposed-B GEMM at the small M of decode steps (fp32 without the
  kernel, and CUDA).
- oneDNN packed (CPU bf16/fp16): the weight reordered once into oneDNN's blocked layout. On CPUs
  without AMX, torch's plain bf16 GEMM is 1.1-2x slower than oneDNN's packed one at every batch
  size (measured: batch 1 13.6 -> 6.7 ms, batch 32 68 -> 61 ms for SmolLM2's projections).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from choral.kernels.build import load_small_gemm

logger = logging.getLogger(__name__)

_PACK_BATCH_HINT = 32  # oneDNN picks its blocking for this M; any M works


def onednn_packing_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch build can pack and run oneDNN linears for ``dtype`` here."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        w = torch.randn(8, 16).to(dtype)
        x = torch.randn(3, 16).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_BATCH_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y.float(), (x.float() @ w.float().t()), atol=0.1, rtol=0.05))
    except (RuntimeError, AttributeError) as e:
        logger.info("oneDNN packed linear unavailable (%s); using plain matmul", e)
        return False


def panel_gemm_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether fp32 projections can use the panel-packed C GEMM here."""
    return device.type == "cpu" and dtype == torch.float32 and load_small_gemm() is not None


_PANEL = 32  # columns per packed panel (small_gemm.c's PANEL)


class Projection:
    """A frozen linear layer: ``proj(x)`` maps [T, in] -> [T, out].

    ``layout`` is ``"onednn"`` (CPU bf16/fp16), ``"panels"`` (CPU fp32 with the C kernel) or
    ``"dense"`` (anything else)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.layout = layout
        self.num_parameters = weight.numel() + (bias.numel() if bias is not None else 0)
        self._lib: ctypes.CDLL | None = None
        if layout == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        elif layout == "panels":
            self._lib = load_small_gemm()
            assert self._lib is not None, "panel layout without the compiled kernel"
            w = weight.t().contiguous()  # [in, out]
            panels = -(-self.out_features // _PANEL)
            self.weight = torch.empty(panels, self.in_features, _PANEL, dtype=torch.float32)
            self._lib.small_gemm_pack_f32(w.data_ptr(), self.weight.data_ptr(), self.in_features,
                                          self.out_features)
            if bias is not None:
                self.bias = bias.contiguous()
        else:
            self.weight = weight.t().contiguous()  # [in, out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._lib is not None:
            if x.dim() != 2 or x.stride(1) != 1 or x.dtype != torch.float32:
                x = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
            y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
            self._lib.small_gemm_f32(x.data_ptr(), self.weight.data_ptr(),
                                     self.bias.data_ptr() if self.bias is not None else None, y.data_ptr(),
                                     x.shape[0], self.in_features, self.out_features, x.stride(0),
                                     torch.get_num_threads())
            return y
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)
