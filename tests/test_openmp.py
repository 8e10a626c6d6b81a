"""Releasing the caller's OpenMP pool before the Executor's loop thread takes over the forwards
(``choral/kernels/openmp.py`` says why): the pool's worker threads go away, and torch and the
C kernels still compute right on that thread afterwards (a new pool is built)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from choral.kernels.openmp import loaded_libgomp, release_thread_pool
from choral.kernels.small_gemm import SmallGemm
from choral.models.linear import Projection


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or loaded_libgomp() is None,
                    reason="needs Linux and torch's libgomp")
def test_release_frees_the_workers_and_work_goes_on() -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: there is no pool to release")
    result: dict[str, object] = {}

    def on_a_fresh_thread() -> None:  # a thread of our own, so the test owns its pool
        before = _os_threads()
        a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
        torch.exp(torch.randn(4_000_000))  # a parallel region: builds this thread's pool
        pooled = _os_threads()
        result["released"] = release_thread_pool()
        result["freed"] = pooled - _os_threads()
        result["grew"] = pooled - before
        ref = (a.double() @ a.double()).float()
        torch.testing.assert_close(a @ a, ref, rtol=1e-4, atol=1e-3)  # a new pool, same answer
        if SmallGemm.load(torch.float32) is not None:
            w = torch.randn(96, 384, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(Projection(w, None, "panels")(a), a @ w.t(), rtol=1e-4, atol=1e-3)
        result["ok"] = True

    t = threading.Thread(target=on_a_fresh_thread)
    t.start()
    t.join()
    assert result.get("ok"), result
    assert result["released"] is True
    assert result["grew"] >= 1 and result["freed"] == result["grew"]
