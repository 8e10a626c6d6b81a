"""The state callers and the loop thread share, always under one condition variable.

Callers put jobs, cancels and loop commands in; the loop takes them out between steps and puts
responses back on the jobs. Nothing here touches the model or the KV cache.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future

from choral.errors import ExecutorLoopError, ProcessorStopped, QueueFull
from choral.executor.job import Job


class RequestQueue:
    """Incoming jobs, cancels, commands, and every request not yet collected (``jobs``)."""

    def __init__(self, max_queue_size: int):
        self.max_queue_size = max_queue_size
        self.cond = threading.Condition()
        self.incoming: list[Job] = []
        self.cancels: set[int] = set()
        self.commands: list[tuple[Callable[[], int], Future[int]]] = []
        self.jobs: dict[int, Job] = {}  # by request id, until the caller has taken everything
        self.num_queued = 0  # requests accepted and not yet admitted by the scheduler
        self.stopping = False
        self.stopped = False
        self.drain = True  # while stopping: finish what runs (else cancel it)
        self.error: BaseException | None = None  # what killed the loop
        self._ids = itertools.count()

    def put(self, jobs: list[Job]) -> list[int]:
        """Accept validated jobs, all or none. Raises ProcessorStopped or QueueFull."""
        with self.cond:
            # The loop's failure first: a dead loop is also ``stopped``, and that is not the news.
            if self.error is not None:
                raise ProcessorStopped(f"the executor loop failed: {self.error!r}")
            if self.stopping or self.stopped:
                raise ProcessorStopped("the executor has been shut down")
            if self.num_queued + len(jobs) > self.max_queue_size:
                raise QueueFull(f"queue full: {self.num_queued} requests waiting (max_queue_size "
                                f"{self.max_queue_size})")
            for job in jobs:
                # Numbered only once accepted, so a rejected request uses up no id.
                job.request_id = job.arrival_order = next(self._ids)
                job.root.request_id = str(job.request_id)
                self.jobs[job.request_id] = job
                self.incoming.append(job)
                self.num_queued += 1
            self.cond.notify_all()
        return [j.request_id for j in jobs]

    def has_work(self, loop_busy: bool) -> bool:
        """Whether the loop has anything to do (call under ``cond``)."""
        return bool(self.incoming or self.cancels or self.commands or loop_busy or self.stopping)

    def check_loop(self) -> None:
        """Raise if the loop died (call under ``cond``)."""
        if self.error is not None:
            raise ExecutorLoopError(f"the executor loop failed: {self.error!r}") from self.error

    def run_on_loop(self, fn: Callable[[], int]) -> int:
        """Run ``fn`` on the loop thread between steps and return its result."""
        future: Future[int] = Future()
        with self.cond:
            if self.error is not None:
                raise ProcessorStopped(f"the executor loop failed: {self.error!r}")
            if self.stopped:
                raise ProcessorStopped("the executor has been shut down")
            self.commands.append((fn, future))
            self.cond.notify_all()
        return future.result()
