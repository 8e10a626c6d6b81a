"""The Executor: a request queue and a background loop running continuous batching.

Threads: any number of user threads call ``enqueue`` / ``await_responses`` / ``cancel`` /
``submit``; they only touch the incoming list, the cancel set and per-request response queues,
under the queue's condition variable, so a forward never runs under that lock. The loop thread
owns the scheduler and drives the engine core (model runner, KV cache, sampler) while holding the
core's lock, which other clients of the same core (a BatchedExecutor on the same LLM) take too.

The request path: ``Intake.make_job`` (validation, intake.py) -> ``RequestQueue.put``
(request_queue.py) -> the loop thread (loop.py): ``Scheduler.schedule`` (scheduler.py) ->
``core.step`` (choral/engine/engine_core.py) -> ``StepRunner.update``: sampling, forks,
beams (step_runner.py) -> ``Responder``
(responses.py) -> the job's responses, or a Completion (completion.py) for ``submit``/``poll``.
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from choral.config import DEFAULT_MODEL, EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.prompts import to_token_ids
from choral.errors import (
    ExecutorUsageError,
    InvalidRequestError,
    KvCacheExhaustedError,
    RequestFailedError,
    UnknownRequestError,
)
from choral.executor.completion import Completion, build_completion
from choral.executor.config import ExecutorConfig
from choral.executor.loop import Loop
from choral.executor.request import Request, Response
from choral.executor.request_queue import RequestQueue
from choral.executor.stats import AggregateStats, IterationStats
from choral.executor.stepper import Stepper
from choral.kernels.openmp import release_thread_pool


class Executor:
    """Continuous batching over one model.

    Args:
        model: a model name/path (loaded with ``engine_options``) or an existing LLMEngine.
        config: batching strategy, KV policy, queue size, prefix cache...
    """

    def __init__(self, model: str | LLMEngine = DEFAULT_MODEL, config: ExecutorConfig | None = None,
                 **engine_options: Any):
        self.config = config or ExecutorConfig()
        if isinstance(model, LLMEngine):
            if engine_options:
                raise InvalidRequestError("engine options only apply when the executor loads the model")
            self.engine = model
        else:
            self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))
        # An engine built here is ours to close at shutdown (its tensor-parallel workers, if any).
        self._owns_engine = not isinstance(model, LLMEngine)
        core = self.engine.core
        with core.lock:
            core.kv.pool.record_events = self.config.record_kv_events
        self.kv = core.kv
        self.stepper = Stepper(self.engine, self.config)
        self.scheduler = self.stepper.scheduler
        self.intake = self.stepper.intake
        self.responder = self.stepper.responder
        self.step_runner = self.stepper.step_runner
        self._queue = RequestQueue(self.config.max_queue_size)
        self._loop = Loop(self._queue, self.config, self.stepper)
        # The loop thread runs every forward from here on; the idle OpenMP pool this thread built
        # while loading would stop the loop's workers from spinning between kernels.
        release_thread_pool()
        self._loop.thread.start()

    # ---- public API: enqueue / await ------------------------------------------------------------
    def enqueue(self, request: Request) -> int:
        """Queue a request; returns its id. Raises InvalidRequestError, QueueFull, ProcessorStopped."""
        return self.enqueue_many([request])[0]

    def enqueue_many(self, requests: Sequence[Request]) -> list[int]:
        """Queue several requests; all are validated first, so a bad one queues none."""
        return self._queue.put([self.intake.make_job(r, collect=False) for r in _request_list(requests)])

    def validate(self, request: Request) -> None:
        """Raise what ``enqueue`` would raise for ``request`` (InvalidRequestError...); queue nothing."""
        self.intake.make_job(request, collect=True)

    def await_responses(self, ids: int | Sequence[int] | None = None, timeout: float | None = None) -> list[Response]:
        """Wait for responses. ``None``: any request's; an id: that request's; a list of ids:
        until each has at least one (or the timeout), then all of theirs. Returns [] on timeout.
        Raises UnknownRequestError if another caller takes a wanted request's last responses first."""
        if timeout is None or timeout > 0:
            self._forbid_on_loop("await_responses with a timeout other than 0")
        wanted, single = _request_ids(ids)
        if wanted == []:
            return []
        q = self._queue
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.cond:
            self._check_enqueued(wanted)
            while True:
                ready = self._ready(wanted, single)
                if ready:
                    out: list[Response] = []
                    for rid in ready:
                        job = q.jobs[rid]
                        out.extend(job.responses)
                        job.responses.clear()
                        if job.done:
                            del q.jobs[rid]
                    return out
                q.check_loop()
                taken = [rid for rid in wanted or () if rid not in q.jobs]
                if taken:  # by another thread's await_responses: nothing more will come here
                    raise UnknownRequestError(f"request {taken[0]}'s responses were all taken by another caller "
                                              "while this one waited")
                if q.stopped:  # everything ended before the loop did: nothing more will come
                    return []
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                q.cond.wait(remaining)

    def num_responses_ready(self, request_id: int | None = None) -> int:
        """Responses waiting to be taken: for one request, or for every enqueued one."""
        q = self._queue
        with q.cond:
            if request_id is None:
                return sum(len(j.responses) for j in q.jobs.values() if not j.collect)
            job = q.jobs.get(_request_id(request_id))
            return len(job.responses) if job is not None else 0

    def release(self, request_id: int) -> None:
        """The caller will not collect this request's results: forget it once it is done."""
        q = self._queue
        request_id = _request_id(request_id)
        with q.cond:
            job = q.jobs.get(request_id)
            if job is None:
                return
            if job.done:
                del q.jobs[request_id]
            else:
                job.released = True

    def cancel(self, request_id: int) -> None:
        """Cancel a request: it ends with CANCELLED and what it generated so far; its blocks are
        freed before the next step. Cancelling a finished or unknown request does nothing."""
        q = self._queue
        request_id = _request_id(request_id)
        with q.cond:
            if request_id in q.jobs and not q.jobs[request_id].done:
                q.cancels.add(request_id)
                q.cond.notify_all()

    # ---- public API: zigllama's shape ---------------------------------------------------------
    def submit(self, request: Request, timeout: float | None = None) -> Completion:
        """Run a request to completion and return everything it produced (blocking)."""
        self._forbid_on_loop("submit")
        rid = self.submit_async(request)
        completion = self.poll(rid, timeout=timeout, _wait=True)
        if completion is None:
            self.cancel(rid)
            completion = self.poll(rid, timeout=None, _wait=True)
        assert completion is not None
        return completion

    def submit_async(self, request: Request) -> int:
        """Queue a request whose result is fetched later with ``poll(id)``."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> list[int]:
        """``submit_async`` for several requests; all are validated first, so a bad one queues none."""
        return self._queue.put([self.intake.make_job(r, collect=True) for r in _request_list(requests)])

    def poll(self, request_id: int, timeout: float | None = 0.0, _wait: bool = False) -> Completion | None:
        """The finished request's Completion (taken: a second poll raises), or None if not done.
        Raises RequestFailedError if the request failed on its own (its logits processor raised)."""
        if timeout is None or timeout > 0:
            self._forbid_on_loop("poll with a timeout other than 0")
        q = self._queue
        request_id = _request_id(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.cond:
            job = q.jobs.get(request_id)
            if job is None or not job.collect:
                raise UnknownRequestError(f"no submitted request with id {request_id}")
            while not job.done:
                q.check_loop()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                q.cond.wait(remaining)
            if q.jobs.pop(request_id, None) is None:  # another thread's poll took it while this one waited
                raise UnknownRequestError(f"request {request_id}'s result was taken by another caller while this "
                                          "one waited")
            if job.error is not None:
                raise RequestFailedError(f"request {request_id} failed: {job.error}") from job.error_cause
            return build_completion(job)

    # ---- public API: lifecycle, stats ---------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting requests. ``wait``: finish everything queued and running; else cancel it.
        From a request callback only ``wait=False`` works, and it returns before the loop ends."""
        if wait:
            self._forbid_on_loop("shutdown(wait=True)")
        q = self._queue
        with q.cond:
            q.stopping = True
            q.drain = wait
            if not wait:
                q.cancels.update(rid for rid, j in q.jobs.items() if not j.done)
            q.cond.notify_all()
        if threading.current_thread() is not self._loop.thread:  # a callback: the loop ends after it returns
            self._loop.thread.join()
            if self._owns_engine:
                self.engine.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    @property
    def is_running(self) -> bool:
        return not self._queue.stopped and self._queue.error is None

    def raise_if_failed(self) -> None:
        """Raise ExecutorLoopError (caused by the loop's error) if the loop thread died."""
        with self._queue.cond:
            self._queue.check_loop()

    @property
    def num_queued_not_scheduled(self) -> int:
        """Requests accepted but not yet handed to the scheduler (racy read, for metrics)."""
        return len(self._queue.incoming)

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        """Iteration stats since the last call (TRT-LLM semantics)."""
        with self._queue.cond:
            out = list(self._loop.unread_stats)
            self._loop.unread_stats.clear()
            return out

    def get_kv_cache_events(self) -> list[tuple[str, int, int]]:
        """(kind, block id, block hash) events since the last call; needs record_kv_events."""
        return self.engine.core.take_kv_events()

    def pin_prefix(self, prompt: str | Sequence[int]) -> int:
        """Compute ``prompt``'s KV and keep its full blocks cached until ``unpin_prefix``.
        Returns the number of pinned blocks."""
        self._forbid_on_loop("pin_prefix")
        job = self.intake.make_job(Request(prompt, max_tokens=1), collect=True)
        job.unbatched = True  # a FIXED_SIZE executor must not wait for batch_size requests to pin
        (rid,) = self._queue.put([job])
        self.poll(rid, timeout=None, _wait=True)
        return self._queue.run_on_loop(lambda: self._pin(prompt, True))

    def unpin_prefix(self, prompt: str | Sequence[int]) -> int:
        self._forbid_on_loop("unpin_prefix")
        return self._queue.run_on_loop(lambda: self._pin(prompt, False))

    @property
    def iteration_stats(self) -> list[IterationStats]:
        """The latest steps' stats, oldest first: a copy of the loop's ring buffer of
        ``iteration_stats_max`` (the loop appends to it while requests run)."""
        with self._queue.cond:
            return list(self._loop.iteration_stats)

    @property
    def aggregate(self) -> AggregateStats:
        """Totals since start."""
        return self.responder.aggregate

    # ---- await internals ----------------------------------------------------------------------
    def _forbid_on_loop(self, call: str) -> None:
        """Raise if a request callback (run on the loop thread) makes a call that waits for the
        loop: it would wait for itself, and every request would stall with it."""
        if threading.current_thread() is self._loop.thread:
            raise ExecutorUsageError(
                f"{call} cannot be called from a request callback: callbacks run on the executor's loop "
                "thread and must not block on it (use enqueue, submit_async, cancel, or poll/await_responses "
                "with timeout=0)")

    def _check_enqueued(self, wanted: list[int] | None) -> None:
        for rid in wanted or ():
            job = self._queue.jobs.get(rid)
            if job is None or job.collect:
                raise UnknownRequestError(f"no enqueued request with id {rid} (or its responses were all taken)")

    def _ready(self, wanted: list[int] | None, single: bool) -> list[int]:
        jobs = self._queue.jobs
        if wanted is None:
            return [rid for rid, j in jobs.items() if j.responses and not j.collect]
        have = [rid for rid in wanted if rid in jobs and jobs[rid].responses]
        if single or len(have) == len(wanted):
            return have
        return []

    # ---- prefix pinning: pool bookkeeping, so it runs on the loop thread between steps ------
    def _pin(self, prompt: str | Sequence[int], pin: bool) -> int:
        _, token_ids = to_token_ids(prompt, self.engine.tokenizer)
        blocks = self.kv.cached_prefix_blocks(token_ids) if self.config.enable_prefix_cache else []
        if not pin:
            self.kv.unpin(blocks)
            return len(blocks)
        # Pinned blocks leave the cache for good: every accepted request must still fit alone.
        usable = self.kv.num_unpinned_blocks - self.kv.num_unpinned_among(blocks)
        with self._queue.cond:
            jobs = [j for j in self._queue.jobs.values() if not j.done]
        need = max((self.scheduler.blocks_to_run_alone(j) for j in jobs), default=0)
        if usable < need:
            raise KvCacheExhaustedError(
                f"pin_prefix: pinning {len(blocks)} blocks would leave {usable} of {self.kv.num_blocks} for "
                f"requests, and an accepted request may need {need}")
        self.kv.pin(blocks)
        return len(blocks)


def _request_id(value: Any) -> int:
    """``value`` as a request id: an int or anything int-like (numpy's integers), never a bool."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise InvalidRequestError(f"request ids are ints, got {value!r} ({type(value).__name__})")


def _request_ids(ids: Any) -> tuple[list[int] | None, bool]:
    """``await_responses``' ids as (a list without repeats, or None for any; whether one id was given)."""
    if ids is None:
        return None, False
    if isinstance(ids, Iterable) and not isinstance(ids, str | bytes):
        # Without repeats: a repeated id would take its request's responses twice, the second time
        # from a job already forgotten.
        return list(dict.fromkeys(_request_id(rid) for rid in ids)), False
    return [_request_id(ids)], True


def _request_list(requests: Any) -> list[Request]:
    if isinstance(requests, Iterable) and not isinstance(requests, str | bytes):
        return list(requests)
    raise InvalidRequestError(f"expected a sequence of Requests, got {type(requests).__name__}")
