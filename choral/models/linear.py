"""Projections (y = x W^T + b) with the weight stored the way the device's GEMM likes it.

- Dense: the weight kept transposed, [in, out], so ``x @ w`` reads it row-major; MKL runs that
  faster than F.linear's transposed-B GEMM at the small M of decode steps (fp32, and CUDA).
- oneDNN packed (CPU bf16/fp16): the weight reordered once into oneDNN's blocked layout. On CPUs
  without AMX, torch's plain bf16 GEMM is 1.1-2x slower than oneDNN's packed one at every batch
  size (measured: batch 1 13.6 -> 6.7 ms, batch 32 68 -> 61 ms for SmolLM2's projections).
"""

from __future__ import annotations

import logging

import torch

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


class Projection:
    """A frozen linear layer: ``proj(x)`` maps [T, in] -> [T, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = packed
        self.num_parameters = weight.numel() + (bias.numel() if bias is not None else 0)
        if packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        else:
            self.weight = weight.t().contiguous()  # [in, out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)
