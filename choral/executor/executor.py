"""The Executor: a request queue and a background loop running continuous batching.

Threads: any number of user threads call ``enqueue`` / ``await_responses`` / ``cancel`` /
``submit``; they only touch the incoming list, the cancel set and per-request response queues,
under one condition variable. The loop thread alone owns the scheduler, the KV pool and the
model runner, so a forward never runs under the lock.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from choral.config import DEFAULT_MODEL, EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from choral.engine.prompts import to_token_ids, validate_token_ids
from choral.errors import InvalidRequestError, ProcessorStopped, QueueFull, UnknownRequestError
from choral.executor.completion import Completion, build_completion
from choral.executor.config import ExecutorConfig
from choral.executor.detokenizer import IncrementalDetokenizer
from choral.executor.job import ExecSequence, Job
from choral.executor.kv_manager import KvManager
from choral.executor.request import FinishReason, Request, Response, Result, Timing
from choral.executor.scheduler import ScheduledStep, Scheduler
from choral.executor.stats import AggregateStats, IterationStats
from choral.sampling.logits_process import bad_word_token_ids
from choral.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.005  # re-check timers (DYNAMIC_TIMEOUT, deadlines) this often while idle


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
        self._cond = threading.Condition()
        self._incoming: list[Job] = []
        self._cancels: set[int] = set()
        self._commands: list[tuple[Callable[[], int], Future[int]]] = []
        self._pending: list[tuple[Job, Response, bool]] = []  # responses of the current step
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._num_queued = 0  # requests enqueued and not yet admitted
        self._stopping = False
        self._stopped = False
        self._drain = True
        self._iteration = 0
        self.iteration_stats: deque[IterationStats] = deque(maxlen=self.config.iteration_stats_max)
        self._unread_stats: deque[IterationStats] = deque(maxlen=self.config.iteration_stats_max)
        self.aggregate = AggregateStats()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="choral-executor", daemon=True)
        self._thread.start()

    # ---- public API: enqueue / await ------------------------------------------------------------
    def enqueue(self, request: Request) -> int:
        """Queue a request; returns its id. Raises InvalidRequestError, QueueFull, ProcessorStopped."""
        return self._enqueue(request, collect=False)

    def enqueue_many(self, requests: Sequence[Request]) -> list[int]:
        """Queue several requests; all are validated first, so a bad one queues none."""
        jobs = [self._make_job(r, collect=False) for r in requests]
        with self._cond:
            self._check_accepting(len(jobs))
            for job in jobs:
                self._admit_job(job)
            self._cond.notify_all()
        return [j.request_id for j in jobs]

    def await_responses(self, ids: int | Sequence[int] | None = None, timeout: float | None = None) -> list[Response]:
        """Wait for responses. ``None``: any request's; an id: that request's; a list of ids:
        until each has at least one (or the timeout), then all of theirs. Returns [] on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            wanted = self._resolve_ids(ids)
            while True:
                ready = self._ready(wanted, ids)
                if ready:
                    out: list[Response] = []
                    for rid in ready:
                        job = self._jobs[rid]
                        out.extend(job.responses)
                        job.responses.clear()
                        if job.done:
                            del self._jobs[rid]
                    return out
                if self._error is not None:
                    raise RuntimeError("the executor loop failed") from self._error
                if self._stopped and not any(rid in self._jobs for rid in (wanted or [])):
                    return []
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def num_responses_ready(self, request_id: int | None = None) -> int:
        with self._cond:
            if request_id is None:
                return sum(len(j.responses) for j in self._jobs.values() if not j.collect)
            job = self._jobs.get(request_id)
            return len(job.responses) if job is not None else 0

    def release(self, request_id: int) -> None:
        """The caller will not collect this request's results: forget it once it is done."""
        with self._cond:
            job = self._jobs.get(request_id)
            if job is None:
                return
            if job.done:
                del self._jobs[request_id]
            else:
                job.released = True

    def cancel(self, request_id: int) -> None:
        """Cancel a request: it ends with CANCELLED and what it generated so far; its blocks are
        freed before the next step. Cancelling a finished or unknown request does nothing."""
        with self._cond:
            if request_id in self._jobs and not self._jobs[request_id].done:
                self._cancels.add(request_id)
                self._cond.notify_all()

    # ---- public API: zigllama's shape ---------------------------------------------------------
    def submit(self, request: Request, timeout: float | None = None) -> Completion:
        """Run a request to completion and return everything it produced (blocking)."""
        rid = self._enqueue(request, collect=True)
        completion = self.poll(rid, timeout=timeout, _wait=True)
        if completion is None:
            self.cancel(rid)
            completion = self.poll(rid, timeout=None, _wait=True)
        assert completion is not None
        return completion

    def submit_async(self, request: Request) -> int:
        """Queue a request whose result is fetched later with ``poll(id)``."""
        return self._enqueue(request, collect=True)

    def poll(self, request_id: int, timeout: float | None = 0.0, _wait: bool = False) -> Completion | None:
        """The finished request's Completion (taken: a second poll raises), or None if not done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            job = self._jobs.get(request_id)
            if job is None or not job.collect:
                raise UnknownRequestError(f"no submitted request with id {request_id}")
            while not job.done:
                if self._error is not None:
                    raise RuntimeError("the executor loop failed") from self._error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            del self._jobs[request_id]
            return build_completion(job, self._prompt_text(job))

    # ---- public API: lifecycle, stats ---------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting requests. ``wait``: finish everything queued and running; else cancel it."""
        with self._cond:
            self._stopping = True
            self._drain = wait
            if not wait:
                self._cancels.update(rid for rid, j in self._jobs.items() if not j.done)
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    @property
    def is_running(self) -> bool:
        return not self._stopped and self._error is None

    @property
    def num_queued_not_scheduled(self) -> int:
        """Requests accepted but not yet handed to the scheduler (racy read, for metrics)."""
        return len(self._incoming)

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        """Iteration stats since the last call (TRT-LLM semantics)."""
        with self._cond:
            out = list(self._unread_stats)
            self._unread_stats.clear()
            return out

    def get_kv_cache_events(self) -> list[tuple[str, int, int]]:
        """(kind, block id, block hash) events since the last call; needs record_kv_events."""
        with self._cond:
            events = list(self.kv.pool.stats.events)
            self.kv.pool.stats.events.clear()
            return events

    def pin_prefix(self, prompt: str | Sequence[int]) -> int:
        """Compute ``prompt``'s KV and keep its full blocks cached until ``unpin_prefix``.
        Returns the number of pinned blocks."""
        self.submit(Request(prompt, max_tokens=1))
        return self._run_on_loop(lambda: self._pin(prompt, True))

    def unpin_prefix(self, prompt: str | Sequence[int]) -> int:
        return self._run_on_loop(lambda: self._pin(prompt, False))

    # ---- enqueue internals ----------------------------------------------------------------------
    def _enqueue(self, request: Request, collect: bool) -> int:
        job = self._make_job(request, collect)
        with self._cond:
            self._check_accepting(1)
            self._admit_job(job)
            self._cond.notify_all()
        return job.request_id

    def _make_job(self, request: Request, collect: bool) -> Job:
        if not isinstance(request, Request):
            raise InvalidRequestError(f"expected a Request, got {type(request).__name__}")
        engine = self.engine
        _, token_ids = to_token_ids(request.prompt, engine.tokenizer)
        validate_token_ids(token_ids, engine.loaded.spec.vocab_size, engine.max_model_len)
        vocab = engine.loaded.spec.vocab_size
        for t in (*request.sampling.stop_token_ids, *(x for w in request.stop_words for x in w)):
            if t >= vocab:
                raise InvalidRequestError(f"stop token id {t} is out of range [0, {vocab})")
        if request.end_id is not None and request.end_id >= vocab:
            raise InvalidRequestError(f"end_id: {request.end_id} is out of range [0, {vocab})")
        params = request.sampling
        if params.beam_width > 1:
            raise InvalidRequestError("beam_width: beam search runs in LLM.generate; the executor samples")
        if params.best_of is not None and params.best_of > params.n:
            raise InvalidRequestError("best_of: ranking extra samples runs in LLM.generate; use n here")
        if request.n > 1 and params.n > 1 and request.n != params.n:
            raise InvalidRequestError(f"n: the request asks for {request.n}, its sampling params for {params.n}")
        n = max(request.n, params.n)
        if n > engine.config.max_num_seqs:
            raise InvalidRequestError(f"n: {n} exceeds max_num_seqs {engine.config.max_num_seqs}")
        if params.greedy and n > 1:
            raise InvalidRequestError("n: greedy sampling (temperature 0) would give n identical sequences")
        engine.logits_processors.check(params.logits_processors)
        bad_words = bad_word_token_ids(params.bad_words, engine.tokenizer)
        if params.structured:
            engine._grammar_compiler()  # fails now, not in the loop, if the grammar engine cannot run
        if request.end_id is not None and request.end_id not in params.stop_token_ids:
            # min_tokens masks stop ids; the end id is checked first, so it still ends as END_ID.
            params = dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, request.end_id))
        if n != request.n or params is not request.sampling:
            request = dataclasses.replace(request, n=n, sampling=params)
        now = time.monotonic()
        job = Job(
            request_id=next(self._ids), request=request, prompt_token_ids=token_ids,
            arrival_order=next(self._arrivals), timing=Timing(arrival=now),
            deadline=None if request.allotted_time is None else now + request.allotted_time, collect=collect,
        )
        job.bad_words = bad_words
        job.sequences.append(self._new_sequence(job, 0, token_ids))
        return job

    def _new_sequence(self, job: Job, index: int, token_ids: list[int]) -> ExecSequence:
        params = job.request.sampling
        seq = ExecSequence(next(self._seq_ids), list(job.prompt_token_ids), params, token_ids=list(token_ids),
                           job=job, index=index)
        seq.detok = IncrementalDetokenizer(self.engine.tokenizer, params.stop, params.skip_special_tokens)
        seq.request_id = str(job.request_id)
        seq.bad_words = list(job.bad_words)
        if params.structured:
            seq.grammar = self.engine._grammar_compiler().matcher(params)  # each sample parses its own output
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.engine.runner.device)
            seq.generator.manual_seed(params.seed + index)
        return seq

    def _check_accepting(self, count: int) -> None:
        if self._stopping or self._stopped:
            raise ProcessorStopped("the executor has been shut down")
        if self._error is not None:
            raise ProcessorStopped(f"the executor loop failed: {self._error!r}")
        if self._num_queued + count > self.config.max_queue_size:
            raise QueueFull(f"queue full: {self._num_queued} requests waiting (max_queue_size "
                            f"{self.config.max_queue_size})")

    def _admit_job(self, job: Job) -> None:
        self._jobs[job.request_id] = job
        self._incoming.append(job)
        self._num_queued += 1

    def _resolve_ids(self, ids: int | Sequence[int] | None) -> list[int] | None:
        if ids is None:
            return None
        wanted = [ids] if isinstance(ids, int) else list(ids)
        for rid in wanted:
            job = self._jobs.get(rid)
            if job is None or job.collect:
                raise UnknownRequestError(f"no enqueued request with id {rid} (or its responses were all taken)")
        return wanted

    def _ready(self, wanted: list[int] | None, ids: int | Sequence[int] | None) -> list[int]:
        if wanted is None:
            return [rid for rid, j in self._jobs.items() if j.responses and not j.collect]
        have = [rid for rid in wanted if rid in self._jobs and self._jobs[rid].responses]
        if isinstance(ids, int) or len(have) == len(wanted):
            return have
        return []

    def _prompt_text(self, job: Job) -> str | None:
        prompt = job.request.prompt
        return prompt if isinstance(prompt, str) else None

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._incoming or self._cancels or self._commands or self.scheduler.running
                               or self.scheduler.waiting or self._stopping):
                        self._cond.wait()
                    incoming, self._incoming = self._incoming, []
                    cancels, self._cancels = self._cancels, set()
                    commands, self._commands = self._commands, []
                    if self._stopping:
                        self.scheduler.flush = True
                        if not self._drain:
                            cancels |= {j.request_id for j in incoming}
                for job in incoming:
                    self.scheduler.add(job.sequences[0])
                for fn, future in commands:
                    try:
                        future.set_result(fn())
                    except Exception as e:  # reported to the caller, the loop goes on
                        future.set_exception(e)
                self._end_jobs(cancels, FinishReason.CANCELLED)
                self._expire()
                self._deliver()
                if self._stopping and not (self.scheduler.running or self.scheduler.waiting or self._incoming):
                    break
                started = time.perf_counter()
                step = self.scheduler.schedule()
                if not step.items:
                    with self._cond:
                        self._cond.wait(_IDLE_WAIT_S)
                    continue
                self._run_step(step)
                elapsed = time.perf_counter() - started
                self.scheduler.after_step(elapsed)
                self._record(step, elapsed)
                self._deliver()
        except BaseException as e:  # a bug in the loop: fail every request loudly, never hang
            logger.exception("choral executor loop failed")
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            with self._cond:
                self._stopped = True
                for _, future in self._commands:
                    future.set_exception(ProcessorStopped("the executor has been shut down"))
                self._commands.clear()
                self._cond.notify_all()

    def _run_step(self, step: ScheduledStep) -> None:
        now = time.monotonic()
        for seq in step.admitted:
            job = seq.job
            assert job is not None
            if job.timing.first_scheduled is None:
                job.timing.first_scheduled = now
                with self._cond:
                    self._num_queued -= 1
        runner = self.engine.runner
        runner.copy_blocks(step.copies)
        chunks = []
        for seq, n in step.items:
            start = seq.num_computed_tokens
            completes = start + n == seq.num_tokens
            wants_prompt_lp = (seq.index == 0 and seq.params.prompt_logprobs is not None
                               and len(seq.prompt_logprobs) < seq.num_prompt_tokens)
            mode = "all" if wants_prompt_lp else ("last" if completes else "none")
            chunks.append(Chunk(seq.token_ids[start : start + n], start, seq.block_table, logits=mode))
        results = runner.execute(chunks)
        rows: list[torch.Tensor] = []
        to_sample: list[ExecSequence] = []
        for (seq, n), chunk, logits in zip(step.items, chunks, results, strict=True):
            start = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.kv.register_full_blocks(seq)
            if logits is not None and chunk.logits == "all":
                self.engine._record_prompt_logprobs(seq, start, logits)
            if seq.num_computed_tokens == seq.num_tokens:
                assert logits is not None
                to_sample.append(seq)
                rows.append(logits[-1])
                job = seq.job
                assert job is not None
                if seq.index == 0 and job.request.n > 1 and not job.forked:
                    for child in self._fork(job, seq):
                        to_sample.append(child)
                        rows.append(logits[-1])
        if to_sample:
            self._sample(to_sample, rows)

    def _fork(self, job: Job, parent: ExecSequence) -> list[ExecSequence]:
        children = []
        for index in range(1, job.request.n):
            child = self._new_sequence(job, index, parent.token_ids)
            self.kv.fork(parent, child)
            child.status = parent.status
            self.scheduler.running.append(child)
            job.sequences.append(child)
            children.append(child)
        job.forked = True
        return children

    def _sample(self, seqs: list[ExecSequence], rows: list[torch.Tensor]) -> None:
        engine = self.engine
        result = engine.sampler.sample(torch.stack(rows), seqs)
        now = time.monotonic()
        for seq, token, lp in zip(seqs, result.token_ids, result.logprobs, strict=True):
            job = seq.job
            assert job is not None and seq.detok is not None
            if job.timing.first_token is None:
                job.timing.first_token = now
            seq.token_ids.append(token)
            if lp is not None:
                seq.output_logprobs.append(lp)
            seq.detok.add(token)
            reason = self._stop_reason(seq, token)
            if reason is not FinishReason.NOT_FINISHED:
                self._finish_sequence(seq, reason)
            elif job.request.streaming:
                self._respond(seq, final=False)

    def _stop_reason(self, seq: ExecSequence, token: int) -> FinishReason:
        job = seq.job
        assert job is not None and seq.detok is not None
        params, request = seq.params, job.request
        if token == request.end_id or (not params.ignore_eos and token in self.engine.eos_token_ids):
            return FinishReason.END_ID
        if token in params.stop_token_ids:
            return FinishReason.STOP_WORDS
        out = seq.output_token_ids
        if seq.num_output_tokens >= params.min_tokens:
            if any(len(w) <= len(out) and tuple(out[-len(w):]) == w for w in request.stop_words):
                return FinishReason.STOP_WORDS
            if seq.detok.stopped_on is not None:
                return FinishReason.STOP_WORDS
        if seq.num_output_tokens >= request.effective_max_tokens or seq.num_tokens >= self.engine.max_model_len:
            return FinishReason.LENGTH
        return FinishReason.NOT_FINISHED

    # ---- endings ------------------------------------------------------------------------------
    def _finish_sequence(self, seq: ExecSequence, reason: FinishReason) -> None:
        seq.finish = reason
        self.scheduler.remove(seq)
        self._respond(seq, final=True)

    def _end_jobs(self, request_ids: set[int], reason: FinishReason) -> None:
        for rid in request_ids:
            job = self._jobs.get(rid)
            if job is None or job.done:
                continue
            if job.timing.first_scheduled is None:
                with self._cond:
                    self._num_queued -= 1
                job.timing.first_scheduled = time.monotonic()
            for seq in list(job.sequences):
                if seq.finish is FinishReason.NOT_FINISHED:
                    self._finish_sequence(seq, reason)
            if job.request.n > 1 and not job.forked:
                # Siblings never forked: they end too, with nothing generated.
                for index in range(1, job.request.n):
                    sibling = self._new_sequence(job, index, job.prompt_token_ids)
                    job.sequences.append(sibling)
                    self._finish_sequence(sibling, reason)
                job.forked = True

    def _expire(self) -> None:
        now = time.monotonic()
        expired = {rid for rid, j in list(self._jobs.items())
                   if not j.done and j.deadline is not None and now >= j.deadline}
        self._end_jobs(expired, FinishReason.TIMED_OUT)

    def _respond(self, seq: ExecSequence, final: bool) -> None:
        job = seq.job
        assert job is not None and seq.detok is not None
        request = job.request
        now = time.monotonic()
        all_final = final and all(s.finish is not FinishReason.NOT_FINISHED for s in job.sequences) and (
            job.forked or request.n == 1)
        if all_final:
            job.timing.finished = now
        text = seq.detok.flush() if final else seq.detok.delta(final=False)
        if request.streaming:
            tokens = seq.output_token_ids[seq.sent_tokens :]
            logprobs = seq.output_logprobs[seq.sent_logprobs :] if seq.params.logprobs is not None else None
        else:
            tokens = seq.output_token_ids
            logprobs = seq.output_logprobs if seq.params.logprobs is not None else None
            if not request.exclude_input_from_output:
                tokens = job.prompt_token_ids + tokens
                prompt = self._prompt_text(job)
                text = (prompt or "") + text
        seq.sent_tokens = seq.num_output_tokens
        seq.sent_logprobs = len(seq.output_logprobs)
        if not request.streaming and not final:
            return
        result = Result(
            is_final=all_final, is_sequence_final=final, sequence_index=seq.index, output_token_ids=list(tokens),
            text=text, finish_reason=seq.finish, logprobs=list(logprobs) if logprobs is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens, timing=job.timing,
        )
        response = Response(job.request_id, request.client_id, result=result)
        if all_final:
            self._account(job)
        self._pending.append((job, response, all_final))

    def _deliver(self) -> None:
        """Hand out this step's responses: after its stats are recorded, so a caller woken by a
        response always finds the step that produced it in ``iteration_stats``."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        with self._cond:
            for job, response, all_final in pending:
                if not job.collect:
                    job.responses.append(response)
                if all_final:
                    job.done = True
                    if job.released:
                        self._jobs.pop(job.request_id, None)
            self._cond.notify_all()
        for job, response, _ in pending:
            if job.request.callback is not None:
                try:
                    job.request.callback(response)
                except Exception:  # a user's callback must not kill the loop
                    logger.exception("request %d: callback raised", job.request_id)

    def _account(self, job: Job) -> None:
        agg = self.aggregate
        agg.total_requests += 1
        reasons = {s.finish for s in job.sequences}
        if FinishReason.CANCELLED in reasons:
            agg.cancelled += 1
        elif FinishReason.TIMED_OUT in reasons:
            agg.timed_out += 1
        else:
            agg.completed += 1
        agg.total_prompt_tokens += len(job.prompt_token_ids)
        agg.total_cached_prompt_tokens += job.sequences[0].num_cached_tokens
        agg.total_output_tokens += sum(s.num_output_tokens for s in job.sequences)
        agg.total_preemptions += sum(s.num_preemptions for s in job.sequences)
        t = job.timing
        agg.sum_latency_s += t.latency or 0.0
        agg.sum_queue_time_s += t.queue_time or 0.0
        if t.time_to_first_token is not None:
            agg.sum_ttft_s += t.time_to_first_token
            agg.num_with_first_token += 1

    def _record(self, step: ScheduledStep, elapsed: float) -> None:
        pool = self.kv.pool
        self._iteration += 1
        self.aggregate.busy_time_s += elapsed
        stats = IterationStats(
            iteration=self._iteration, timestamp=time.time(), step_latency_s=elapsed,
            num_prefill_tokens=step.num_prefill_tokens, num_decode_tokens=step.num_decode_tokens,
            num_scheduled_sequences=len(step.items), num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), kv_blocks_used=pool.num_used_blocks,
            kv_blocks_free=pool.num_free_blocks, kv_blocks_cached=pool.num_cached_blocks,
            prefix_hit_blocks=step.prefix_hit_blocks, num_preemptions=len(step.preempted),
            num_admitted=len(step.admitted), seq_cap=self.scheduler.seq_cap,
        )
        with self._cond:
            self.iteration_stats.append(stats)
            self._unread_stats.append(stats)

    # ---- prefix pinning: pool bookkeeping, so it runs on the loop thread between steps ------
    def _run_on_loop(self, fn: Callable[[], int]) -> int:
        future: Future[int] = Future()
        with self._cond:
            if self._stopped:
                raise ProcessorStopped("the executor has been shut down")
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def _pin(self, prompt: str | Sequence[int], pin: bool) -> int:
        _, token_ids = to_token_ids(prompt, self.engine.tokenizer)
        # One extra token so every full block of the prompt is eligible for a match.
        probe = ExecSequence(-1, token_ids, SamplingParams(), token_ids=[*token_ids, 0])
        blocks = self.kv.match_prefix(probe)
        (self.kv.pool.pin if pin else self.kv.pool.unpin)(blocks)
        return len(blocks)
