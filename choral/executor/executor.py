"""The Executor: a request queue and a background loop running continuous batching.

Threads: any number of user threads call ``enqueue`` / ``await_responses`` / ``cancel`` /
``submit``; they only touch the incoming list, the cancel set and per-request response queues,
under one condition variable. The loop thread alone owns the scheduler, the KV pool and the
model runner, so a forward never runs under the lock.

The request path: ``Intake.make_job`` (validation, intake.py) -> ``RequestQueue.put``
(request_queue.py) -> the loop thread (loop.py): ``Scheduler.schedule`` (scheduler.py) ->
``StepRunner.run``: forward, sampling, forks, beams (step_runner.py) -> ``Responder``
(responses.py) -> the job's responses, or a Completion (completion.py) for ``submit``/``poll``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from choral.config import DEFAULT_MODEL, EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.prompts import to_token_ids
from choral.errors import InvalidRequestError, UnknownRequestError
from choral.executor.completion import Completion, build_completion
from choral.executor.config import ExecutorConfig
from choral.executor.intake import Intake
from choral.executor.job import ExecSequence
from choral.executor.kv_manager import KvManager
from choral.executor.loop import Loop
from choral.executor.request import Request, Response
from choral.executor.request_queue import RequestQueue
from choral.executor.responses import Responder
from choral.executor.scheduler import Scheduler
from choral.executor.stats import AggregateStats, IterationStats
from choral.executor.step_runner import StepRunner
from choral.kernels.openmp import release_thread_pool
from choral.sampling.params import SamplingParams


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
        pool = self.engine.pool
        pool.record_events = self.config.record_kv_events
        self.kv = KvManager(pool, self.config.enable_prefix_cache)
        ecfg = self.engine.config
        self.scheduler = Scheduler(self.config, self.kv, ecfg.max_num_seqs, ecfg.max_num_batched_tokens,
                                   self.engine.max_model_len, time.monotonic)
        self.intake = Intake(self.engine)
        self.responder = Responder(self.scheduler, self.intake, self.engine.eos_token_ids, AggregateStats())
        self.step_runner = StepRunner(self.engine, self.kv, self.scheduler, self.intake, self.responder)
        self._queue = RequestQueue(self.config.max_queue_size)
        self._loop = Loop(self._queue, self.config, self.kv, self.scheduler, self.step_runner, self.responder)
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
        return self._queue.put([self.intake.make_job(r, collect=False) for r in requests])

    def validate(self, request: Request) -> None:
        """Raise what ``enqueue`` would raise for ``request`` (InvalidRequestError...); queue nothing."""
        self.intake.make_job(request, collect=True)

    def await_responses(self, ids: int | Sequence[int] | None = None, timeout: float | None = None) -> list[Response]:
        """Wait for responses. ``None``: any request's; an id: that request's; a list of ids:
        until each has at least one (or the timeout), then all of theirs. Returns [] on timeout."""
        q = self._queue
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.cond:
            wanted = self._resolve_ids(ids)
            while True:
                ready = self._ready(wanted, ids)
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
                if q.stopped and not any(rid in q.jobs for rid in (wanted or [])):
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
            job = q.jobs.get(request_id)
            return len(job.responses) if job is not None else 0

    def release(self, request_id: int) -> None:
        """The caller will not collect this request's results: forget it once it is done."""
        q = self._queue
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
        with q.cond:
            if request_id in q.jobs and not q.jobs[request_id].done:
                q.cancels.add(request_id)
                q.cond.notify_all()

    # ---- public API: zigllama's shape ---------------------------------------------------------
    def submit(self, request: Request, timeout: float | None = None) -> Completion:
        """Run a request to completion and return everything it produced (blocking)."""
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
        return self._queue.put([self.intake.make_job(r, collect=True) for r in requests])

    def poll(self, request_id: int, timeout: float | None = 0.0, _wait: bool = False) -> Completion | None:
        """The finished request's Completion (taken: a second poll raises), or None if not done."""
        q = self._queue
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
            del q.jobs[request_id]
            return build_completion(job)

    # ---- public API: lifecycle, stats ---------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting requests. ``wait``: finish everything queued and running; else cancel it."""
        q = self._queue
        with q.cond:
            q.stopping = True
            q.drain = wait
            if not wait:
                q.cancels.update(rid for rid, j in q.jobs.items() if not j.done)
            q.cond.notify_all()
        self._loop.thread.join()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    @property
    def is_running(self) -> bool:
        return not self._queue.stopped and self._queue.error is None

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
        with self._queue.cond:
            events = list(self.kv.pool.stats.events)
            self.kv.pool.stats.events.clear()
            return events

    def pin_prefix(self, prompt: str | Sequence[int]) -> int:
        """Compute ``prompt``'s KV and keep its full blocks cached until ``unpin_prefix``.
        Returns the number of pinned blocks."""
        self.submit(Request(prompt, max_tokens=1))
        return self._queue.run_on_loop(lambda: self._pin(prompt, True))

    def unpin_prefix(self, prompt: str | Sequence[int]) -> int:
        return self._queue.run_on_loop(lambda: self._pin(prompt, False))

    @property
    def iteration_stats(self) -> deque[IterationStats]:
        """The latest steps' stats (a ring buffer of ``iteration_stats_max``)."""
        return self._loop.iteration_stats

    @property
    def aggregate(self) -> AggregateStats:
        """Totals since start."""
        return self.responder.aggregate

    # ---- await internals ----------------------------------------------------------------------
    def _resolve_ids(self, ids: int | Sequence[int] | None) -> list[int] | None:
        if ids is None:
            return None
        wanted = [ids] if isinstance(ids, int) else list(ids)
        for rid in wanted:
            job = self._queue.jobs.get(rid)
            if job is None or job.collect:
                raise UnknownRequestError(f"no enqueued request with id {rid} (or its responses were all taken)")
        return wanted

    def _ready(self, wanted: list[int] | None, ids: int | Sequence[int] | None) -> list[int]:
        jobs = self._queue.jobs
        if wanted is None:
            return [rid for rid, j in jobs.items() if j.responses and not j.collect]
        have = [rid for rid in wanted if rid in jobs and jobs[rid].responses]
        if isinstance(ids, int) or len(have) == len(wanted):
            return have
        return []

    # ---- prefix pinning: pool bookkeeping, so it runs on the loop thread between steps ------
    def _pin(self, prompt: str | Sequence[int], pin: bool) -> int:
        _, token_ids = to_token_ids(prompt, self.engine.tokenizer)
        # One extra token so every full block of the prompt is eligible for a match.
        probe = ExecSequence(-1, token_ids, SamplingParams(), token_ids=[*token_ids, 0])
        blocks = self.kv.match_prefix(probe)
        (self.kv.pool.pin if pin else self.kv.pool.unpin)(blocks)
        return len(blocks)
