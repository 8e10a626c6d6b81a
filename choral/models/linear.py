"""Projections (y = x W^T + b) with the weight stored the way the device's GEMM likes it.

- Panel-packed (CPU fp32 and bf16, when ``choral/kernels/small_gemm.c`` compiles): the weight
  packed once into 32-column panels for our own GEMM. MKL re-packs the weight on every call,
  which at decode batch sizes moves the weights through memory more than once per step
  (measured on SmolLM2's projections at batch 32 with cold weights, 2 threads: 64 -> 44 ms per
  step; batch 8: 49 -> 28). bf16 weights are widened to fp32 in registers and multiplied on the
  fp32 FMA units: on CPUs whose bf16 dot product is half rate (Intel without AMX) those run
  twice as fast as the instruction oneDNN uses (small_gemm.c says more), while moving half the
  weight bytes. Where bf16 dot products are full rate (AMX, AMD Zen 4) oneDNN is ~2x faster.
  ``choose_layout`` times the panels against torch's layout for the dtype once and takes the
  faster, in fp32 as in bf16.
- Dense: the weight kept transposed, [in, out], so ``x @ w`` reads it row-major; MKL runs that
  faster than F.linear's transposed-B GEMM at the small M of decode steps (fp32 without the
  kernel, and CUDA).
- oneDNN packed (CPU bf16/fp16): the weight reordered once into oneDNN's blocked layout. On CPUs
  without AMX, torch's plain bf16 GEMM is 1.1-2x slower than oneDNN's packed one at every batch
  size (measured: batch 1 13.6 -> 6.7 ms, batch 32 68 -> 61 ms for SmolLM2's projections).
"""

from __future__ import annotations

import logging
import time
from functools import cache

import torch

from choral.kernels.small_gemm import PackedWeight, SmallGemm

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
    """Whether projections in ``dtype`` can use the panel-packed C GEMM here."""
    return device.type == "cpu" and SmallGemm.load(dtype) is not None


def choose_layout(dtype: torch.dtype, device: torch.device) -> str:
    """The projection layout for a model in ``dtype`` on ``device``.

    On the CPU the panel-packed C GEMM competes with torch's best layout for the dtype (dense
    MKL for fp32; oneDNN's packed layout for bf16/fp16 where it works, else dense), timed once
    per process and dtype (``_panels_win``), and the faster one is used. Which wins depends on
    the CPU: for bf16, oneDNN runs ~2x our fp32-FMA kernel where bf16 dot products are full rate
    (AMX tiles, AMD Zen 4) and the panels win by as much where they are half rate; for fp32 the
    panels win where MKL re-packs weights each call (decode batch sizes). Timing rather than
    guessing also keeps a CPU nobody measured from running a kernel slower than torch."""
    if device.type != "cpu":
        return "dense"
    other = "onednn" if onednn_packing_works(dtype, device) else "dense"
    if not panel_gemm_available(dtype, device):
        return other
    return "panels" if _panels_win(dtype, other) else other


@cache
def _panels_win(dtype: torch.dtype, other: str) -> bool:
    """Time the panels and ``other`` in ``dtype`` on a decode-sized product ([64, 512] x
    [512, 1024], ~67 MFLOP, a few ms each) and say whether the panels were faster. Best of 5
    after a warm-up, so a busy moment on the machine does not decide it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 512, generator=g).to(dtype)
    x = torch.randn(64, 512, generator=g).to(dtype)
    best = {}
    for layout in ("panels", other):
        proj = Projection(w, None, layout)
        proj(x)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            proj(x)
            times.append(time.perf_counter() - t0)
        best[layout] = min(times)
    logger.info("%s projections: panels %.2f ms, %s %.2f ms per [64, 512] x [512, 1024]",
                dtype, best["panels"] * 1e3, other, best[other] * 1e3)
    # fp32 panels get slack: this product's weight (2 MB) stays in cache, which hides what MKL's
    # re-packing of cold weights on every call costs in a real step (the panels' whole point).
    slack = 1.5 if dtype == torch.float32 else 1.0
    return best["panels"] < best[other] * slack


class Projection:
    """A frozen linear layer: ``proj(x)`` maps [T, in] -> [T, out].

    ``layout`` is ``"panels"`` (CPU fp32/bf16 with the C kernel), ``"onednn"`` (CPU bf16/fp16
    without it) or ``"dense"`` (anything else)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.dtype = weight.dtype
        self.layout = layout
        self.num_parameters = weight.numel() + (bias.numel() if bias is not None else 0)
        self._panels: tuple[SmallGemm, PackedWeight] | None = None
        if layout == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        elif layout == "panels":
            gemm = SmallGemm.load(self.dtype)
            assert gemm is not None, "panel layout without the compiled kernel"
            packed = gemm.pack(weight, bias)
            self._panels = (gemm, packed)
            self.weight = packed.panels
        else:
            self.weight = weight.t().contiguous()  # [in, out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._panels is not None:
            gemm, packed = self._panels
            # The kernel reads x in fp32 (a bf16 x is widened here: M * K elements, small next
            # to the M * K * N multiply-adds) and writes y in the weight's dtype.
            if x.dtype is not torch.float32 or x.ndim != 2 or x.stride(1) != 1:
                x = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
            return gemm(x, packed)
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)
