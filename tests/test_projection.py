"""Projection layouts compute x W^T + b like F.linear: the panel-packed C GEMM (CPU fp32/bf16), the
oneDNN-packed one (CPU bf16/fp16) and the dense fallback, at every shape edge the kernels have."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from choral.kernels.small_gemm import SmallGemm
from choral.models import linear
from choral.models.linear import Projection, choose_layout, onednn_packing_works


@pytest.mark.parametrize(("rows", "in_features", "out_features"), [
    (1, 64, 96), (5, 7, 33), (12, 576, 960), (13, 96, 70), (32, 130, 31), (64, 64, 32), (100, 96, 1100),
    (300, 48, 100),
])
@pytest.mark.parametrize("bias", [False, True])
def test_panels_match_linear(rows: int, in_features: int, out_features: int, bias: bool) -> None:
    if SmallGemm.load(torch.float32) is None:
        pytest.skip("no C compiler: the panel GEMM is unavailable")
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, in_features, generator=g)
    proj = Projection(w, b, "panels")
    expected = F.linear(x, w, b)
    torch.testing.assert_close(proj(x), expected, rtol=1e-5, atol=1e-4)
    # A row-strided view (the q/k/v split hands such slices around) reads the same rows.
    wide = torch.randn(rows, in_features + 9, generator=g)
    view = wide[:, 3 : 3 + in_features]
    torch.testing.assert_close(proj(view), F.linear(view, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("rows", "in_features", "out_features"), [
    (1, 64, 96), (5, 7, 33), (13, 96, 70), (32, 130, 31), (64, 576, 960), (80, 64, 2000), (300, 48, 100),
])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_panels_match_fp32_linear_then_rounding(rows: int, in_features: int, out_features: int,
                                                     bias: bool) -> None:
    """bf16 weights widened in registers and multiplied in fp32: the result is the fp32 product
    of the bf16 operands, rounded once to bf16 (so within one bf16 ulp of it, not more)."""
    if SmallGemm.load(torch.float32) is None:
        pytest.skip("no C compiler: the panel GEMM is unavailable")
    g = torch.Generator().manual_seed(rows * 1000 + out_features + 7)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    proj = Projection(w, b, "panels")
    got = proj(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    exact = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    # One rounding to bf16 (relative 2^-9) plus fp32 accumulation error over K terms.
    tol = exact.abs() * 2.0 ** -8 + 1e-4 * in_features ** 0.5
    assert ((got.double() - exact).abs() <= tol).all()
    # Strided rows and an fp32 input take the same path.
    wide = torch.randn(rows, in_features + 9, generator=g)
    view = wide[:, 3 : 3 + in_features]
    exact_view = F.linear(view.double(), w.double(), b.double() if b is not None else None)
    tol_view = exact_view.abs() * 2.0 ** -8 + 1e-4 * in_features ** 0.5
    assert ((proj(view).double() - exact_view).abs() <= tol_view).all()


def test_bf16_panels_keep_nan_and_inf() -> None:
    if SmallGemm.load(torch.float32) is None:
        pytest.skip("no C compiler: the panel GEMM is unavailable")
    w = torch.ones(40, 8, dtype=torch.bfloat16)
    x = torch.ones(2, 8)
    x[0, 0] = float("nan")
    x[1, 0] = float("inf")
    y = Projection(w, None, "panels")(x)
    assert torch.isnan(y[0]).all() and torch.isinf(y[1]).all()


def test_dense_and_onednn_match_linear() -> None:
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(40, 24, generator=g), torch.randn(40, generator=g), torch.randn(6, 24, generator=g)
    torch.testing.assert_close(Projection(w, b, "dense")(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    if onednn_packing_works(torch.bfloat16, torch.device("cpu")):
        got = Projection(w.bfloat16(), b.bfloat16(), "onednn")(x.bfloat16()).float()
        assert (got - F.linear(x, w, b)).abs().max() < 0.1


def test_layout_choice() -> None:
    cpu = torch.device("cpu")
    kernel = SmallGemm.load(torch.float32) is not None
    # The panels are timed against torch's layout for the dtype: oneDNN's packed one for bf16
    # where it works, else dense.
    assert choose_layout(torch.float32, cpu) in ({"panels", "dense"} if kernel else {"dense"})
    bf16 = choose_layout(torch.bfloat16, cpu)
    other = "onednn" if onednn_packing_works(torch.bfloat16, cpu) else "dense"
    assert bf16 in ({"panels", other} if kernel else {other})
    assert choose_layout(torch.float32, torch.device("meta")) == "dense"


def test_layout_choice_times_the_kernel(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """A CPU where the panel GEMM is slower than torch (it once ran at 4 GFLOP/s on an AVX2-only
    CPU) gets torch's layout: the choice is timed, not assumed."""
    if SmallGemm.load(torch.float32) is None:
        pytest.skip("no C compiler: the panel GEMM is unavailable")
    cpu = torch.device("cpu")
    request.addfinalizer(linear._panels_win.cache_clear)  # forget what the patched kernels timed
    real_gemm = SmallGemm.__call__

    def slow_gemm(self, x, packed):  # type: ignore[no-untyped-def]
        if self.dtype == torch.float32:
            time.sleep(0.2)
        return real_gemm(self, x, packed)

    monkeypatch.setattr(SmallGemm, "__call__", slow_gemm)
    linear._panels_win.cache_clear()
    assert choose_layout(torch.float32, cpu) == "dense"
    # And the other way: torch's GEMM made slow, the panels win.
    monkeypatch.setattr(SmallGemm, "__call__", real_gemm)
    real_mm = torch.mm

    def slow_mm(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return real_mm(*args, **kwargs)
    monkeypatch.setattr(torch, "mm", slow_mm)
    linear._panels_win.cache_clear()
    assert choose_layout(torch.float32, cpu) == "panels"
