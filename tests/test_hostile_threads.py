"""The default thread count leaves out the cores other processes are using (issue case 8)."""

from __future__ import annotations

import os

import pytest
import torch

from choral.threads import default_num_threads


@pytest.mark.parametrize("load, cores, base, expected", [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (1.0, 2, 2, 1), (1.6, 2, 2, 1), (9.0, 2, 2, 1),
    (10.0, 64, 32, 32), (40.0, 64, 32, 24), (0.0, 8, 4, 4),
])
def test_default_threads_follow_the_load(monkeypatch: pytest.MonkeyPatch, load: float, cores: int, base: int,
                                         expected: int) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: base)
    assert default_num_threads() == expected


def test_omp_num_threads_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_num_threads() == 2
