"""The scheduler: who runs this step, with how many tokens.

Each step fills a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``, or the adaptive cap): decode tokens of running sequences first, then the next
chunks of prompts already admitted, then new admissions in priority order (higher first, FIFO
within a level, waiting time adding ``priority_aging_per_s`` per second). Admission allocates the
whole uncached prompt at once, so a prompt's later chunks never wait for blocks; decodes take a
block at each block boundary and, under MAX_UTILIZATION, preempt the lowest-priority, newest
sequence when none is free. A beam-search request is preempted whole: every beam is freed and it
restarts from its prompt. The scheduler only sees allocation results from the KvManager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from choral.executor.beams import beam_kv_blocks
from choral.executor.config import BatchingStrategy, ExecutorConfig, KvPolicy
from choral.executor.job import ExecSequence, Job
from choral.executor.kv_manager import KvManager
from choral.kv.block_pool import blocks_for_tokens

_BATCHED = (BatchingStrategy.STATIC, BatchingStrategy.FIXED_SIZE, BatchingStrategy.DYNAMIC_TIMEOUT)


@dataclass
class ScheduledStep:
    items: list[tuple[ExecSequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    preempted: list[ExecSequence] = field(default_factory=list)
    admitted: list[ExecSequence] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    prefix_hit_blocks: int = 0


class Scheduler:
    def __init__(self, config: ExecutorConfig, kv: KvManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, clock: Callable[[], float]):
        self.config = config
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.clock = clock
        self.waiting: list[ExecSequence] = []
        self.running: list[ExecSequence] = []
        self.adaptive_cap = max_num_seqs if config.strategy is not BatchingStrategy.ADAPTIVE else max(
            config.adaptive_min_batch, min(max_num_seqs, config.batch_size))
        self.flush = False  # shutting down: FIXED_SIZE / DYNAMIC_TIMEOUT start partial batches

    # ---- queue -----------------------------------------------------------------------------
    def add(self, seq: ExecSequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: ExecSequence) -> None:
        """Take a sequence out of the queues (finished, cancelled, timed out) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.kv.free(seq)

    @property
    def seq_cap(self) -> int:
        return self.adaptive_cap if self.config.strategy is BatchingStrategy.ADAPTIVE else self.max_num_seqs

    def _order(self, seqs: list[ExecSequence]) -> list[ExecSequence]:
        now = self.clock()
        aging = self.config.priority_aging_per_s

        def key(s: ExecSequence) -> tuple[float, int, int]:
            job = s.job
            assert job is not None
            return (-job.effective_priority(now, aging), job.arrival_order, s.index)

        return sorted(seqs, key=key)

    def _slots(self, seq: ExecSequence) -> int:
        """Sequence slots a waiting sequence takes: samples still to be forked count already,
        a beam request takes beam_width slots."""
        job = seq.job
        assert job is not None
        return job.num_samples if (seq.index == 0 and not job.forked) else 1

    def _running_slots(self) -> int:
        beam_jobs: dict[int, int] = {}  # request id -> beam_width: however many beams live now
        slots = 0
        for s in self.running:
            job = s.job
            assert job is not None
            if job.beam is not None:
                beam_jobs[job.request_id] = job.num_samples
            else:
                slots += self._slots(s)
        return slots + sum(beam_jobs.values())

    def _final_len(self, job: Job) -> int:
        return min(len(job.prompt_token_ids) + job.request.effective_max_tokens, self.max_model_len)

    def _beam_blocks(self, job: Job) -> int:
        return beam_kv_blocks(len(job.prompt_token_ids), self._final_len(job), job.num_samples, self.kv.block_size)

    def _sibling_blocks(self, job: Job) -> int:
        """GUARANTEED_NO_EVICT: blocks the samples still to be forked may take (one copy-on-write each)."""
        return (job.num_samples - 1) * (blocks_for_tokens(job.request.effective_max_tokens, self.kv.block_size) + 1)

    def _reserved_blocks(self) -> int:
        """GUARANTEED_NO_EVICT: blocks running sequences may still take before they finish."""
        total = 0
        beam_jobs: dict[int, Job] = {}
        for s in self.running:
            job = s.job
            assert job is not None
            if job.beam is not None:
                beam_jobs[job.request_id] = job
                continue
            total += max(0, blocks_for_tokens(self._final_len(job), self.kv.block_size) - len(s.block_table))
            if s.index == 0 and not job.forked:
                total += self._sibling_blocks(job)
        for job in beam_jobs.values():
            assert job.beam is not None
            held = len({b for s in job.beam.live for b in s.block_table})
            total += max(0, self._beam_blocks(job) - held)
        return total

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.max_num_batched_tokens
        policy = self.config.kv_policy
        # 1. Decodes (one token each), highest priority first.
        for seq in self._order([s for s in self.running if s.num_uncomputed_tokens == 1]):
            if budget == 0:
                break
            if seq not in self.running:
                continue  # preempted by an earlier decode this step
            while self.kv.pool.num_free_blocks < self.kv.blocks_to_grow(seq, 1):
                victim = self._victim(exclude=[s for s, _ in step.items])
                if victim is None:
                    break
                self._preempt(victim, step)
                if seq not in self.running:  # preempted itself, or its beam request restarted
                    break
            if seq not in self.running or self.kv.pool.num_free_blocks < self.kv.blocks_to_grow(seq, 1):
                continue
            step.copies.extend(self.kv.grow(seq, 1))
            step.items.append((seq, 1))
            step.num_decode_tokens += 1
            budget -= 1
        # 2. Next chunks of admitted prompts (their blocks were allocated on admission).
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            if budget == 0:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            step.items.append((seq, n))
            step.num_prefill_tokens += n
            budget -= n
        # 3. Admissions.
        if self._may_admit():
            batch_limit = self.config.batch_size if self.config.strategy in (
                BatchingStrategy.FIXED_SIZE, BatchingStrategy.DYNAMIC_TIMEOUT) else None
            admitted = 0
            for seq in self._order(self.waiting):
                if batch_limit is not None and admitted >= batch_limit:
                    break
                if not self._try_admit(seq, step, budget, policy):
                    if self.config.strategy in _BATCHED:
                        break
                    if not self._preempt_for(seq, step) or not self._try_admit(seq, step, budget, policy):
                        break
                admitted += 1
                n = step.items[-1][1] if step.items and step.items[-1][0] is seq else 0
                budget -= n
        return step

    def _may_admit(self) -> bool:
        if not self.waiting:
            return False
        strategy = self.config.strategy
        if strategy in (BatchingStrategy.CONTINUOUS, BatchingStrategy.ADAPTIVE):
            return True
        if self.running:
            return False  # batch-at-a-time strategies wait for the batch to finish
        if strategy is BatchingStrategy.STATIC or self.flush:
            return True
        if strategy is BatchingStrategy.FIXED_SIZE:
            return len(self.waiting) >= self.config.batch_size
        oldest = min(s.job.timing.arrival for s in self.waiting if s.job is not None)
        return (len(self.waiting) >= self.config.batch_size
                or (self.clock() - oldest) * 1000 >= self.config.timeout_ms)

    def _try_admit(self, seq: ExecSequence, step: ScheduledStep, budget: int, policy: KvPolicy) -> bool:
        if self._running_slots() + self._slots(seq) > self.seq_cap:
            return False
        hits = self.kv.match_prefix(seq)
        uncached = seq.num_tokens - len(hits) * self.kv.block_size
        need = self.kv.blocks_to_admit(seq, hits, uncached)
        if policy is KvPolicy.GUARANTEED_NO_EVICT:
            job = seq.job
            assert job is not None
            admitted = blocks_for_tokens(seq.num_tokens, self.kv.block_size)
            if job.beam is not None:
                need += self._beam_blocks(job) - admitted
            else:
                need += blocks_for_tokens(self._final_len(job), self.kv.block_size) - admitted
                if seq.index == 0 and not job.forked:
                    need += self._sibling_blocks(job)
            if self.kv.pool.num_free_blocks - self._reserved_blocks() < need:
                return False
        elif self.kv.pool.num_free_blocks < need:
            return False
        self.waiting.remove(seq)
        self.kv.admit(seq, hits, uncached)
        step.prefix_hit_blocks += len(hits)
        self.running.append(seq)
        step.admitted.append(seq)
        n = min(seq.num_uncomputed_tokens, budget)
        if n > 0:
            step.items.append((seq, n))
            step.num_prefill_tokens += n
        return True

    def _victim(self, exclude: list[ExecSequence]) -> ExecSequence | None:
        """Lowest priority, then newest, running sequence (MAX_UTILIZATION only)."""
        if self.config.kv_policy is not KvPolicy.MAX_UTILIZATION:
            return None
        candidates = [s for s in self.running if s not in exclude]
        if not candidates:
            return None
        return self._order(candidates)[-1]

    def _preempt_for(self, seq: ExecSequence, step: ScheduledStep) -> bool:
        """A waiting request of strictly higher priority may preempt lower running ones."""
        if self.config.kv_policy is not KvPolicy.MAX_UTILIZATION:
            return False
        job = seq.job
        assert job is not None
        scheduled = [s for s, _ in step.items]
        lower = [s for s in self.running if s.job is not None
                 and s.job.request.priority < job.request.priority and s not in scheduled]
        if not lower:
            return False
        self._preempt(self._order(lower)[-1], step)
        return True

    def _preempt(self, seq: ExecSequence, step: ScheduledStep) -> None:
        # Recompute preemption: blocks go back (full ones stay in the prefix cache), tokens stay.
        job = seq.job
        if job is not None and job.beam is not None:
            self._restart_beams(job, step)
            return
        self._unschedule(seq, step)
        seq.num_preemptions += 1
        self.waiting.append(seq)
        step.preempted.append(seq)

    def _restart_beams(self, job: Job, step: ScheduledStep) -> None:
        """Preempt a beam-search request whole: free every beam, requeue its root at the prompt."""
        assert job.beam is not None
        for beam in job.beam.live:
            self._unschedule(beam, step)
        root = job.beam.restart()
        root.num_preemptions += 1
        if root not in self.waiting:
            self.waiting.append(root)
        step.preempted.append(root)

    def _unschedule(self, seq: ExecSequence, step: ScheduledStep) -> None:
        """Take a running sequence out of this step and free its blocks, with the copy-on-write
        copies this step made into them (the blocks may go to another sequence next)."""
        if seq in self.running:
            self.running.remove(seq)
        step.items = [(s, n) for s, n in step.items if s is not seq]
        freed = set(seq.block_table)
        step.copies = [(src, dst) for src, dst in step.copies if dst not in freed]
        self.kv.free(seq)

    def after_step(self, step_latency_s: float) -> None:
        """ADAPTIVE: shrink the cap when steps are slower than the target, grow it under load."""
        if self.config.strategy is not BatchingStrategy.ADAPTIVE:
            return
        if step_latency_s * 1000 > self.config.latency_target_ms:
            self.adaptive_cap = max(self.config.adaptive_min_batch, int(self.adaptive_cap * 3 / 4))
        elif self.waiting:
            self.adaptive_cap = min(self.max_num_seqs, self.adaptive_cap + 1)
