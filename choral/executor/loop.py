"""The executor's loop thread: take commands -> schedule -> core.step -> update -> deliver.

Between steps it takes in new requests, cancels, expirations and commands (under the queue's
lock, briefly); then, holding the engine core's lock, it applies them, schedules a step, runs it
on the core and updates the sequences; then, with no lock held, it hands out the responses (user
callbacks run there). It alone touches the scheduler; the KV cache and the model runner it
reaches only through the core, under the core's lock, which a BatchedExecutor sharing the core
takes too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from choral.errors import ProcessorStopped
from choral.executor.config import ExecutorConfig
from choral.executor.job import ExecSequence, Job
from choral.executor.request_queue import RequestQueue
from choral.executor.scheduler import ScheduledStep
from choral.executor.stats import AggregateStats, IterationStats
from choral.executor.stepper import Stepper
from choral.finish import FinishReason

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.005  # re-check timers (DYNAMIC_TIMEOUT, deadlines) this often while idle


class Loop:
    """The background thread of one Executor."""

    def __init__(self, queue: RequestQueue, config: ExecutorConfig, stepper: Stepper):
        self.queue = queue
        self.stepper = stepper
        self.core = stepper.core
        self.kv = stepper.kv
        self.scheduler = stepper.scheduler
        self.responder = stepper.responder
        self.aggregate: AggregateStats = stepper.responder.aggregate
        self.iteration_stats: deque[IterationStats] = deque(maxlen=config.iteration_stats_max)
        self.unread_stats: deque[IterationStats] = deque(maxlen=config.iteration_stats_max)
        self._iteration = 0
        self.thread = threading.Thread(target=self._run, name="choral-executor", daemon=True)

    def _run(self) -> None:
        q = self.queue
        try:
            while True:
                with q.cond:
                    while not q.has_work(bool(self.scheduler.running or self.scheduler.waiting)):
                        q.cond.wait()
                    incoming, q.incoming = q.incoming, []
                    cancels, q.cancels = q.cancels, set()
                    commands, q.commands = q.commands, []
                    if q.stopping:
                        self.scheduler.flush = True
                        if not q.drain:
                            cancels |= {j.request_id for j in incoming}
                with self.core.lock:
                    for job in incoming:
                        self._accept(job)
                    for fn, future in commands:
                        try:
                            future.set_result(fn())
                        except Exception as e:  # reported to the caller, the loop goes on
                            future.set_exception(e)
                    self._end_jobs(cancels, FinishReason.CANCELLED)
                    self._expire()
                self._deliver()
                if q.stopping and not (self.scheduler.running or self.scheduler.waiting or q.incoming):
                    break
                with self.core.lock:
                    ran = self._step()
                self._deliver()
                if not ran:
                    with q.cond:
                        q.cond.wait(_IDLE_WAIT_S)
        except BaseException as e:  # a bug in the loop: fail every request loudly, never hang
            logger.exception("choral executor loop failed")
            self._give_back_blocks()
            with q.cond:
                q.error = e
                q.cond.notify_all()
        finally:
            with q.cond:
                q.stopped = True
                for _, future in q.commands:
                    future.set_exception(ProcessorStopped("the executor has been shut down"))
                q.commands.clear()
                q.cond.notify_all()

    def _step(self) -> bool:
        """The stepper's schedule -> core.step -> update, and its stats (the caller holds the
        core's lock). False when nothing could run."""
        started = time.perf_counter()
        step = self.stepper.step(on_scheduled=self._mark_scheduled)
        if step.items or step.preempted:  # a preemption with nothing run is still recorded
            self._record(step, time.perf_counter() - started)
        return bool(step.items)

    def _accept(self, job: Job) -> None:
        """Hand a new request to the scheduler, unless prefix pins made since its intake check
        leave it no room to ever run: then it fails now rather than waiting forever."""
        if job.ended:
            return  # cancelled or timed out while it waited in the incoming list: answered already
        need, usable = self.scheduler.blocks_to_run_alone(job), self.kv.num_unpinned_blocks
        if need <= usable:
            self.scheduler.add(job.root)
            return
        self._end_queued(job)
        self.responder.fail_job(job, f"the request may need {need} KV blocks at once; {usable} are not pinned")

    def _end_queued(self, job: Job) -> None:
        if job.timing.first_scheduled is None:
            with self.queue.cond:
                self.queue.num_queued -= 1
            job.timing.first_scheduled = time.monotonic()

    def _give_back_blocks(self) -> None:
        """After a failure: free what the loop's sequences hold, so the engine (and its pool,
        which others may share) stays usable by a new executor."""
        with self.core.lock:
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                try:
                    self.kv.free(seq)
                    if seq.spec is not None:
                        seq.spec.close()
                except Exception:  # the books may be what broke: keep going, the error is reported
                    logger.exception("choral executor: freeing sequence %d after the failure", seq.seq_id)
            self.scheduler.running.clear()
            self.scheduler.waiting.clear()

    def _mark_scheduled(self, admitted: list[ExecSequence]) -> None:
        now = time.monotonic()
        for seq in admitted:
            job = seq.job
            assert job is not None
            if job.timing.first_scheduled is None:
                job.timing.first_scheduled = now
                with self.queue.cond:
                    self.queue.num_queued -= 1

    def _end_jobs(self, request_ids: set[int], reason: FinishReason) -> None:
        for rid in request_ids:
            job = self.queue.jobs.get(rid)
            if job is None or job.ended:
                continue
            self._end_queued(job)
            self.responder.end_job(job, reason)

    def _expire(self) -> None:
        now = time.monotonic()
        with self.queue.cond:  # callers add and take jobs under it: copy the table whole
            jobs = list(self.queue.jobs.items())
        expired = {rid for rid, j in jobs if not j.done and j.deadline is not None and now >= j.deadline}
        self._end_jobs(expired, FinishReason.TIMED_OUT)

    def _deliver(self) -> None:
        """Hand out this step's responses: after its stats are recorded, so a caller woken by a
        response always finds the step that produced it in ``iteration_stats``."""
        pending, self.responder.pending = self.responder.pending, []
        if not pending:
            return
        q = self.queue
        with q.cond:
            for job, response, all_final in pending:
                if not job.collect:
                    job.responses.append(response)
                if all_final:
                    job.done = True
                    if job.released:
                        q.jobs.pop(job.request_id, None)
            q.cond.notify_all()
        for job, response, _ in pending:
            if job.request.callback is not None:
                try:
                    job.request.callback(response)
                except Exception:  # a user's callback must not kill the loop
                    logger.exception("request %d: callback raised", job.request_id)

    def _record(self, step: ScheduledStep, elapsed: float) -> None:
        usage = self.kv.usage()
        self._iteration += 1
        self.aggregate.busy_time_s += elapsed
        stats = IterationStats(
            iteration=self._iteration, timestamp=time.time(), step_latency_s=elapsed,
            num_prefill_tokens=step.num_prefill_tokens, num_decode_tokens=step.num_decode_tokens,
            num_scheduled_sequences=len(step.items), num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), kv_blocks_used=usage.num_used_blocks,
            kv_blocks_free=usage.num_free_blocks, kv_blocks_cached=usage.num_cached_blocks,
            prefix_hit_blocks=step.prefix_hit_blocks, num_preemptions=len(step.preempted),
            num_admitted=len(step.admitted), seq_cap=self.scheduler.seq_cap,
            num_draft_tokens=step.num_draft_tokens, num_accepted_tokens=step.num_accepted_tokens,
        )
        with self.queue.cond:
            self.iteration_stats.append(stats)
            self.unread_stats.append(stats)
