"""An all-reduce between processes on one host through one shared memory mapping.

Why: a CPU decode step all-reduces a few KiB twice per layer; gloo moves each through loopback
TCP (syscalls, a copy into and out of the kernel, wake-ups), tens of microseconds per call,
which vLLM's CPU backend also found too slow for per-step use. Here every rank copies its
tensor into its own slot of a shared mapping, raises its "arrived" counter, spins until every
rank has arrived, and sums the slots in rank order (the same order on every rank, so all ranks
hold bitwise the same result, as the replicated residual stream needs). Before reusing its slot a
rank waits until every rank has finished reading the previous round ("done" counters).
benchmarks/bench_tp.py measures it against gloo.

Layout: per rank a 64-byte line with two int64 counters (arrived, done: one cache line per rank,
so ranks do not write the same line), then ``world`` data slots of ``slot_bytes``.
Ordering: the slot's bytes are written before the counter by a separate call, and x86 keeps
stores in order (TSO) and loads in order; on weaker memory models (ARM) this would need fences,
so the option is documented for x86 hosts.

Waiting: spins with ``os.sched_yield()`` between polls, so a rank waiting on a descheduled peer
hands it the core instead of burning its time slice (a 2-core host with other load).
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

_LINE = 64  # bytes per rank's counters
_ARRIVED, _DONE = 0, 1


def create_segment(world: int, slot_bytes: int) -> str:
    """Make the backing file (in /dev/shm when it exists) and return its path; every rank then
    opens it with :class:`ShmAllReduce`, and rank 0 removes the name once all have."""
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="choral-tp-", dir=directory)
    try:
        os.ftruncate(fd, _LINE * world + slot_bytes * world)
    finally:
        os.close(fd)
    return path


class ShmAllReduce:
    """Rank ``rank`` of ``world``'s end: ``all_reduce(t)`` sums ``t`` over the ranks in place."""

    def __init__(self, path: str, rank: int, world: int, slot_bytes: int, timeout_s: float = 300.0,
                 check: Callable[[], None] | None = None):
        # ``check`` runs every ~50 ms while this rank waits: it raises when a peer is known dead
        # (rank 0 watches its workers' processes; a worker dies with rank 0 through its stdin).
        self.check = check
        self.rank = rank
        self.world = world
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _LINE * world + slot_bytes * world)
        # [world, 8] int64: column 0 arrived, column 1 done (the rest of each line is padding)
        self._counters = np.frombuffer(self._map, dtype=np.int64, count=world * (_LINE // 8)).reshape(world, -1)
        self._data_offset = _LINE * world
        self._round = 0
        self._slots: dict[torch.dtype, list[torch.Tensor]] = {}  # per dtype: each rank's whole slot, flat

    def _slot(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        slots = self._slots.get(tensor.dtype)
        if slots is None:
            count = self.slot_bytes // tensor.element_size()
            slots = [torch.frombuffer(self._map, dtype=tensor.dtype, count=count,
                                      offset=self._data_offset + r * self.slot_bytes) for r in range(self.world)]
            self._slots[tensor.dtype] = slots
        return slots[rank][: tensor.numel()].view(tensor.shape)

    def _wait(self, column: int, value: int) -> None:
        counters = self._counters
        if (counters[:, column] >= value).all():
            return
        now = time.monotonic()
        deadline, next_check = now + self.timeout_s, now + 0.05
        while not (counters[:, column] >= value).all():
            os.sched_yield()
            now = time.monotonic()
            if self.check is not None and now > next_check:
                self.check()
                next_check = now + 0.05
            if now > deadline:
                behind = [r for r in range(self.world) if counters[r, column] < value]
                raise RuntimeError(f"shared-memory all-reduce: ranks {behind} did not arrive in {self.timeout_s:.0f} s")

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() <= self.slot_bytes

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if not self.fits(tensor):
            raise ValueError(f"shared-memory all-reduce: {tensor.numel() * tensor.element_size()} bytes exceed "
                             f"the slot of {self.slot_bytes}")
        self._round += 1
        r = self._round
        self._wait(_DONE, r - 1)  # everyone has read the previous round: the slots are free
        self._slot(self.rank, tensor).copy_(tensor)
        self._counters[self.rank, _ARRIVED] = r
        self._wait(_ARRIVED, r)
        tensor.copy_(self._slot(0, tensor))
        for rank in range(1, self.world):  # rank order: the same sum, bit for bit, on every rank
            tensor.add_(self._slot(rank, tensor))
        self._counters[self.rank, _DONE] = r

    def close(self) -> None:
        self._counters = np.zeros((0, 2), dtype=np.int64)
        self._slots.clear()
        try:
            self._map.close()
        except BufferError:  # a tensor view still exists; the mapping goes with it
            pass
