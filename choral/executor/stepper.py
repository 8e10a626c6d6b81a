"""Stepper: the executor's parts over one engine core, and its synchronous step.

``step()`` is the spine: ``Scheduler.schedule()`` (plain data: which sequences, how many tokens,
which block copies) -> ``EngineCore.step(plan)`` -> ``StepRunner.update`` (the one place where
sequences advance, fork, finish and free). The executor's loop thread runs it between taking
commands and delivering responses; a test or a debugger drives it the same way, with no thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from choral.engine.llm_engine import LLMEngine
from choral.executor.config import ExecutorConfig
from choral.executor.intake import Intake
from choral.executor.job import ExecSequence, Job
from choral.executor.request import Request
from choral.executor.responses import Responder
from choral.executor.scheduler import ScheduledStep, Scheduler
from choral.executor.stats import AggregateStats
from choral.executor.step_runner import StepRunner
from choral.speculative.speculator import Speculator


class Stepper:
    """Scheduler, intake, responder and step runner of one executor, over ``engine.core``."""

    def __init__(self, engine: LLMEngine, config: ExecutorConfig, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.core = engine.core
        self.kv = self.core.kv
        ecfg = engine.config
        self.speculator = Speculator(config.speculative, self.core.draft)
        self.scheduler = Scheduler(config, self.kv, ecfg.max_num_seqs, ecfg.max_num_batched_tokens,
                                   engine.max_model_len, clock, self.speculator,
                                   max_loras=ecfg.max_loras if ecfg.enable_lora else 0)
        self.intake = Intake(engine, config.kv_policy, self.speculator)
        self.responder = Responder(self.scheduler, self.intake, AggregateStats())
        self.step_runner = StepRunner(engine, self.scheduler, self.intake, self.responder,
                                      config.enable_prefix_cache, self.speculator)
        self._ids = itertools.count()

    def add(self, request: Request) -> Job:
        """Validate and queue a request directly (synchronous use; the Executor goes through its
        request queue and loop instead)."""
        job = self.intake.make_job(request, collect=True)
        job.request_id = job.arrival_order = next(self._ids)
        job.root.request_id = str(job.request_id)
        with self.core.lock:
            self.scheduler.add(job.root)
        return job

    def step(self, on_scheduled: Callable[[list[ExecSequence]], None] | None = None) -> ScheduledStep:
        """One step: schedule -> core.step -> update. Returns what was scheduled (no items:
        nothing could run). ``on_scheduled`` sees the admitted sequences before the forward."""
        with self.core.lock:
            started = time.perf_counter()
            step = self.scheduler.schedule()
            if step.items:
                if on_scheduled is not None:
                    on_scheduled(step.admitted)
                self.step_runner.run(step)
                elapsed = time.perf_counter() - started
                self.scheduler.after_step(elapsed)
                self.speculator.cost.observe(step.num_tokens, elapsed)
            return step

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def check_integrity(self) -> None:
        """Assert the pool's ref counts equal this executor's block tables (when it owns the
        core alone); the scheduler's queues hold every live sequence."""
        with self.core.lock:
            self.kv.check_integrity([*self.scheduler.running, *self.scheduler.waiting])
