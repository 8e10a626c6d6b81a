"""The collectives between tensor-parallel ranks, on torch.distributed's process groups.

Built directly from a store (``ProcessGroupGloo(store, rank, world)``) rather than through
``init_process_group``: no process-global default group, so several tensor-parallel engines
can live (one after another, or side by side) in one process, and a test can tear one down and
start the next.

- ``all_reduce``: the per-layer sums. Gloo on the CPU; NCCL on CUDA (one GPU per rank). On the
  CPU, with a :class:`~choral.distributed.shm_all_reduce.ShmAllReduce` given, through shared
  memory instead for every tensor that fits its slot (CHORAL_TP_ALLREDUCE=shm; gloo otherwise: the
  size is the same on every rank, so all ranks choose alike).
- ``broadcast_object``: rank 0's step plan to every worker, as pickled bytes in a uint8 tensor,
  always over gloo (the plan is plain Python on the host, as vLLM's CPU group carries its
  metadata). One broadcast of a fixed 64 KiB buffer carries a whole decode or prefill plan; a
  bigger one (soft-prompt vectors, K/V of a loaded conversation) follows in a second broadcast.
- ``send_object`` / ``recv_object``: a worker's K/V back to rank 0 (conversation save).
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from choral.distributed.shm_all_reduce import ShmAllReduce

_FIRST = 1 << 16  # bytes of the first broadcast: length (8 bytes) + the start of the payload
_LEN = 8


class CommGroup:
    """One rank's end of the group: ``rank`` of ``world``, over ``store`` (a TCPStore)."""

    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device, timeout_s: float,
                 shm: ShmAllReduce | None = None):
        self.rank = rank
        self.shm = shm
        self.world = world
        timeout = timedelta(seconds=timeout_s)
        # Typed Any: torch's stubs declare these backends without their collectives.
        self._control: Any = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, world, timeout)
        self._data: Any = self._control
        if device.type == "cuda":  # pragma: no cover - needs a multi-GPU host
            nccl: Any = getattr(dist, "ProcessGroupNCCL")  # noqa: B009 - absent from CPU builds of torch
            options = nccl.Options()
            options._timeout = timeout
            self._data = nccl(dist.PrefixStore("data", store), rank, world, options)
        self._first = torch.zeros(_FIRST, dtype=torch.uint8)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place (contiguous, same shape on every rank)."""
        if self.shm is not None and self.shm.fits(tensor):
            self.shm.all_reduce(tensor)
        else:
            self._data.allreduce([tensor]).wait()

    def broadcast_object(self, obj: object = None) -> Any:
        """Rank 0: send ``obj`` to every rank and return it; the others: return what rank 0 sent."""
        first = self._first
        if self.rank == 0:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            size = len(payload)
            first[:_LEN] = torch.frombuffer(bytearray(size.to_bytes(_LEN, "little")), dtype=torch.uint8)
            head = min(size, _FIRST - _LEN)
            if head:
                first[_LEN : _LEN + head] = torch.frombuffer(bytearray(payload[:head]), dtype=torch.uint8)
            self._control.broadcast([first], dist.BroadcastOptions()).wait()
            if size > head:
                rest = torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8)
                self._control.broadcast([rest], dist.BroadcastOptions()).wait()
            return obj
        self._control.broadcast([first], dist.BroadcastOptions()).wait()
        size = int.from_bytes(bytes(first[:_LEN].numpy()), "little")
        head = min(size, _FIRST - _LEN)
        data = bytes(first[_LEN : _LEN + head].numpy())
        if size > head:
            rest = torch.empty(size - head, dtype=torch.uint8)
            self._control.broadcast([rest], dist.BroadcastOptions()).wait()
            data += bytes(rest.numpy())
        return pickle.loads(data)

    def send_object(self, obj: object, dst: int) -> None:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self._control.send([size], dst, 0).wait()
        self._control.send([torch.frombuffer(bytearray(payload), dtype=torch.uint8)], dst, 1).wait()

    def recv_object(self, src: int) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self._control.recv([size], src, 0).wait()
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self._control.recv([data], src, 1).wait()
        return pickle.loads(bytes(data.numpy()))
