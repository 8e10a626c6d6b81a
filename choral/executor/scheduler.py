"""The scheduler: who runs this step, with how many tokens.

Each step fills a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``, or the adaptive cap): decode tokens of running sequences first, then the next
chunks of prompts already admitted, then new admissions in priority order (higher first, FIFO
within a level, waiting time adding ``priority_aging_per_s`` per second). Admission allocates the
whole uncached prompt at once, so a prompt's later chunks never wait for blocks; decodes take a
block at each block boundary and, under MAX_UTILIZATION, preempt the lowest-priority, newest
sequence when none is free. A beam-search request is preempted whole: every beam is freed and it
restarts from its prompt. The scheduler only sees allocation results from the KvCache
(``allocate_slots`` / ``admit`` return None / False when the blocks are not there): it never
reads free counts or ref counts itself.

Batch-at-a-time strategies (STATIC, FIXED_SIZE, DYNAMIC_TIMEOUT) keep the request ids of the
batch that runs (``batch``): only its members are admitted (as budgets allow, and again after a
preemption) until every member has ended; then the next batch forms.

Nothing accepted can wait forever: every request fits in the cache on its own (intake checks
``blocks_to_run_alone`` against the unpinned blocks, pinning keeps that true), and a request
wider than the adaptive cap is admitted when nothing else runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from choral.executor.beams import beam_kv_blocks
from choral.executor.config import BatchingStrategy, ExecutorConfig, KvPolicy
from choral.executor.job import ExecSequence, Job
from choral.kv.block_pool import blocks_for_tokens
from choral.kv.kv_cache import BlockCopy, KvCache
from choral.speculative.speculator import Speculator

_BATCHED = (BatchingStrategy.STATIC, BatchingStrategy.FIXED_SIZE, BatchingStrategy.DYNAMIC_TIMEOUT)


def blocks_to_run_alone(num_prompt_tokens: int, final_len: int, num_samples: int, beam: bool,
                        policy: KvPolicy, block_size: int) -> int:
    """KV blocks a request needs to run to the end with nothing else in the cache.

    Beams are preempted whole and GUARANTEED_NO_EVICT reserves every sample up front, so those
    need all their sequences at full length (the prompt's full blocks shared). Under
    MAX_UTILIZATION the samples of a plain request can be preempted one by one, so one sample
    at full length is enough."""
    if beam or (num_samples > 1 and policy is KvPolicy.GUARANTEED_NO_EVICT):
        return beam_kv_blocks(num_prompt_tokens, final_len, num_samples, block_size)
    return blocks_for_tokens(final_len, block_size)


@dataclass
class ScheduledStep:
    items: list[tuple[ExecSequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    preempted: list[ExecSequence] = field(default_factory=list)
    admitted: list[ExecSequence] = field(default_factory=list)
    num_tokens: int = 0  # sum of the items' new tokens
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    prefix_hit_blocks: int = 0
    # Speculating decodes: seq_id -> the proposed tokens verified after the sequence's last
    # token (its item then counts 1 + len(proposal) tokens).
    drafts: dict[int, list[int]] = field(default_factory=dict)
    num_accepted_tokens: int = 0  # of the drafts' tokens, accepted (filled in by the step's update)

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(d) for d in self.drafts.values())

    def add(self, seq: ExecSequence, num_tokens: int) -> None:
        self.items.append((seq, num_tokens))
        self.num_tokens += num_tokens


class Scheduler:
    def __init__(self, config: ExecutorConfig, kv: KvCache, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, clock: Callable[[], float], speculator: Speculator | None = None,
                 max_loras: int = 0):
        self.config = config
        self.speculator = speculator or Speculator()
        self.max_loras = max_loras  # distinct LoRA adapters the running sequences may use at once
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.clock = clock
        self.waiting: list[ExecSequence] = []
        self.running: list[ExecSequence] = []
        self.adaptive_floor = min(config.adaptive_min_batch, max_num_seqs)
        self.adaptive_cap = max_num_seqs if config.strategy is not BatchingStrategy.ADAPTIVE else max(
            self.adaptive_floor, min(max_num_seqs, config.batch_size))
        self.batch: set[int] = set()  # batch-at-a-time strategies: request ids of the running batch
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
        if seq.spec is not None:
            seq.spec.close()  # its draft-model KV, if it drafts

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

    def _running_slots(self, running: list[ExecSequence] | None = None) -> int:
        beam_jobs: dict[int, int] = {}  # request id -> beam_width: however many beams live now
        slots = 0
        for s in self.running if running is None else running:
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
        """GUARANTEED_NO_EVICT: blocks the samples still to be forked may take: everything past
        the prompt's full blocks (which they share), the copied partial block included."""
        bs = self.kv.block_size
        private = blocks_for_tokens(self._final_len(job), bs) - len(job.prompt_token_ids) // bs
        return (job.num_samples - 1) * private

    def blocks_to_run_alone(self, job: Job) -> int:
        return blocks_to_run_alone(len(job.prompt_token_ids), self._final_len(job), job.num_samples,
                                   job.beam is not None, self.config.kv_policy, self.kv.block_size)

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
        policy = self.config.kv_policy
        # 0. A waiting request of strictly higher priority takes the place of lower running ones.
        if self.config.strategy not in _BATCHED and policy is KvPolicy.MAX_UTILIZATION:
            self._preempt_for_priority(step)
        # 1. Decodes (one token each, plus a proposal to verify when speculating), highest
        # priority first.
        decodes = self._order([s for s in self.running if s.num_uncomputed_tokens == 1])
        drafts = self.speculator.plan([(s, s.spec, self._draft_limit(s)) for s in decodes if s.spec is not None],
                                      len(decodes), self._budget(step) - len(decodes))
        # Proposals never take the blocks the decodes' own tokens need (no one is preempted for one).
        released: Counter[int] = Counter()
        reserve = sum(self.kv.slots_needed(s, s.num_computed_tokens, s.num_computed_tokens + 1, released)
                      for s in decodes) if drafts else 0
        for seq in decodes:
            if self._budget(step) == 0:
                break
            if seq not in self.running:
                continue  # preempted by an earlier decode this step
            draft = drafts.get(seq.seq_id)
            if draft and self._speculate(seq, step, draft, reserve):
                continue
            copies = self._grow(seq)
            while copies is None:
                victim = self._victim(exclude=[s for s, _ in step.items])
                if victim is None:
                    break
                self._preempt(victim, step)
                if seq not in self.running:  # preempted itself, or its beam request restarted
                    break
                copies = self._grow(seq)
            if copies is None or seq not in self.running:
                continue
            step.copies.extend(copies)
            step.add(seq, 1)
        # 2. Next chunks of admitted prompts (their blocks were allocated on admission).
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            budget = self._budget(step)
            if budget == 0:
                break
            step.add(seq, min(seq.num_uncomputed_tokens, budget))
        # 3. Admissions, while the step has tokens left for their first chunk.
        for seq in self._order(self._admissible()):
            if self._budget(step) == 0:
                break
            if not self._lora_fits(seq, self.running):
                continue  # its adapter would be one too many for the device slots: later
            if self._try_admit(seq, step, policy):
                continue
            if self.config.strategy in _BATCHED:
                break
            if not self._preempt_for(seq, step) or not self._try_admit(seq, step, policy):
                break
        self._count_tokens(step)
        return step

    def _draft_limit(self, seq: ExecSequence) -> int:
        """The most tokens a decode may propose: never more than the request may still generate
        (the last token is the target's own) nor past the context."""
        job = seq.job
        assert job is not None
        return min(job.request.effective_max_tokens - seq.num_output_tokens - 1,
                   self.max_model_len - seq.num_tokens - 1)

    def _speculate(self, seq: ExecSequence, step: ScheduledStep, draft: list[int], reserve: int) -> bool:
        """Schedule ``seq``'s decode with ``draft`` to verify, if its slots are free with
        ``reserve`` blocks left for the step's decodes (else it decodes plainly)."""
        start = seq.num_computed_tokens
        if not self.kv.can_allocate(self.kv.slots_needed(seq, start, start + 1 + len(draft)), reserve):
            return False
        copies = self.kv.allocate_slots(seq, start, start + 1 + len(draft))
        assert copies is not None
        step.copies.extend(copies)
        step.drafts[seq.seq_id] = draft
        step.add(seq, 1 + len(draft))
        return True

    def _grow(self, seq: ExecSequence) -> list[BlockCopy] | None:
        """Room for a running sequence's next token (None: no free block)."""
        return self.kv.allocate_slots(seq, seq.num_computed_tokens, seq.num_computed_tokens + 1)

    def _match(self, seq: ExecSequence) -> list[int]:
        """Prefix-cache hits for a waiting sequence (none when the cache is off, or when the
        request's prompt logprobs need the logits of every prompt position)."""
        if not self.config.enable_prefix_cache:
            return []
        if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens:
            return []
        return self.kv.match_prefix(seq.token_ids, seq.cache_salt)

    def _budget(self, step: ScheduledStep) -> int:
        """Tokens this step can still take (a preemption gives back what its victim had)."""
        return self.max_num_batched_tokens - step.num_tokens

    @staticmethod
    def _count_tokens(step: ScheduledStep) -> None:
        # A decode token is a sequence's newest token (sampled, never computed) fed alone; prompt
        # chunks and the rest of a recompute after a preemption are prefill, even one token long.
        for seq, n in step.items:
            if ((n == 1 or seq.seq_id in step.drafts)
                    and seq.num_computed_tokens == seq.num_tokens - 1 >= seq.num_prompt_tokens):
                step.num_decode_tokens += 1
            else:
                step.num_prefill_tokens += n

    def _admissible(self) -> list[ExecSequence]:
        """The waiting sequences the strategy lets in this step."""
        if not self.waiting:
            return []
        strategy = self.config.strategy
        if strategy not in _BATCHED:
            return self.waiting
        members = [s for s in self.waiting if s.job is not None
                   and (s.job.request_id in self.batch or s.job.unbatched)]
        if members or self.running:
            return members  # the batch runs to completion: only its own members (re)join it
        self.batch.clear()
        if not (strategy is BatchingStrategy.STATIC or self.flush or self._batch_due()):
            return []
        # A new batch: STATIC takes every waiting request the sequence cap holds, the others
        # their batch_size, in priority order.
        limit = self.config.batch_size if strategy is not BatchingStrategy.STATIC else None
        slots = 0
        for seq in self._order(self.waiting):
            job = seq.job
            assert job is not None
            if limit is not None and len(self.batch) >= limit:
                break
            if limit is None and self.batch and slots + self._slots(seq) > self.seq_cap:
                break
            self.batch.add(job.request_id)
            slots += self._slots(seq)
        return [s for s in self.waiting if s.job is not None and s.job.request_id in self.batch]

    def _batch_due(self) -> bool:
        """FIXED_SIZE / DYNAMIC_TIMEOUT: whether a new batch starts now."""
        if len({s.job.request_id for s in self.waiting if s.job is not None}) >= self.config.batch_size:
            return True
        if self.config.strategy is BatchingStrategy.FIXED_SIZE:
            return False
        oldest = min(s.job.timing.arrival for s in self.waiting if s.job is not None)
        return (self.clock() - oldest) * 1000 >= self.config.timeout_ms

    def _fits_cap(self, seq: ExecSequence, running_seqs: list[ExecSequence] | None = None) -> bool:
        running = self._running_slots(running_seqs)
        if running == 0:
            return True  # intake checked it against max_num_seqs; an adaptive cap must not strand it
        return running + self._slots(seq) <= self.seq_cap

    def _lora_fits(self, seq: ExecSequence, running: list[ExecSequence]) -> bool:
        """Whether running ``seq`` with ``running`` keeps the step's distinct adapters within
        ``max_loras`` (the model runner's device slots; see choral/lora/slots.py)."""
        if seq.lora is None:
            return True
        in_use = {s.lora.adapter_id for s in running if s.lora is not None}
        return seq.lora.adapter_id in in_use or len(in_use) < self.max_loras

    def _try_admit(self, seq: ExecSequence, step: ScheduledStep, policy: KvPolicy) -> bool:
        if not self._fits_cap(seq):
            return False
        hits = self._match(seq)
        uncached = seq.num_tokens - len(hits) * self.kv.block_size
        headroom = 0  # blocks the admission must leave free
        if policy is KvPolicy.GUARANTEED_NO_EVICT:
            job = seq.job
            assert job is not None
            admitted = blocks_for_tokens(seq.num_tokens, self.kv.block_size)
            if job.beam is not None:
                headroom += self._beam_blocks(job) - admitted
            else:
                headroom += blocks_for_tokens(self._final_len(job), self.kv.block_size) - admitted
                if seq.index == 0 and not job.forked:
                    headroom += self._sibling_blocks(job)
            headroom += self._reserved_blocks()
        if not self.kv.admit(seq, hits, uncached, headroom, count_queries=self.config.enable_prefix_cache):
            return False
        if seq.num_preemptions == 0:
            # The prompt tokens the cache saved this request. A preempted sequence finds its own
            # blocks again on readmission: those were computed by the request itself.
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        self.waiting.remove(seq)
        step.prefix_hit_blocks += len(hits)
        self.running.append(seq)
        step.admitted.append(seq)
        step.add(seq, min(seq.num_uncomputed_tokens, self._budget(step)))
        return True

    def _victim(self, exclude: list[ExecSequence]) -> ExecSequence | None:
        """Lowest priority, then newest, running sequence (MAX_UTILIZATION only)."""
        if self.config.kv_policy is not KvPolicy.MAX_UTILIZATION:
            return None
        candidates = [s for s in self.running if s not in exclude]
        if not candidates:
            return None
        return self._order(candidates)[-1]

    def _preempt_for_priority(self, step: ScheduledStep) -> None:
        """Before anything is scheduled: the highest-priority waiting request that cannot get in
        preempts running sequences of strictly lower priority (lowest, newest first), if freeing
        them would let it in. Aging does not count here, so preempted requests cannot preempt
        back: priorities are compared as the requests gave them."""
        if not self.waiting or not self.running:
            return
        head = self._order(self.waiting)[0]
        job = head.job
        assert job is not None
        lower = [s for s in self.running if s.job is not None and s.job.request.priority < job.request.priority]
        if not lower or self._admits_now(head):
            return
        victims = self._order(lower)
        if not self._admits_now(head, without=victims):
            return  # even all of them would not make room: preempt nobody
        for victim in reversed(victims):
            if victim in self.running:
                self._preempt(victim, step)
            if self._admits_now(head):
                return

    def _admits_now(self, seq: ExecSequence, without: Sequence[ExecSequence] = ()) -> bool:
        """Whether ``seq`` would pass admission's cap and KV checks, with ``without`` (running
        sequences) gone. Counts only blocks those hold alone, and ignores the token budget."""
        gone = {id(s) for s in without}
        for s in without:
            if s.job is not None and s.job.beam is not None:
                gone.update(id(b) for b in s.job.beam.live)
        remaining = [s for s in self.running if id(s) not in gone]
        if not self._fits_cap(seq, remaining) or not self._lora_fits(seq, remaining):
            return False
        freed = self.kv.blocks_freed_by(s for s in self.running if id(s) in gone)
        hits = self._match(seq)
        need = self.kv.blocks_to_admit(hits, seq.num_tokens - len(hits) * self.kv.block_size)
        return self.kv.can_allocate(max(0, need - freed))

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
        step.drafts.pop(seq.seq_id, None)
        step.num_tokens = sum(n for _, n in step.items)
        freed = set(seq.block_table)
        step.copies = [(src, dst) for src, dst in step.copies if dst not in freed]
        self.kv.free(seq)

    def after_step(self, step_latency_s: float) -> None:
        """ADAPTIVE: shrink the cap when steps are slower than the target, grow it under load."""
        if self.config.strategy is not BatchingStrategy.ADAPTIVE:
            return
        if step_latency_s * 1000 > self.config.latency_target_ms:
            self.adaptive_cap = max(self.adaptive_floor, int(self.adaptive_cap * 3 / 4))
        elif self.waiting:
            self.adaptive_cap = min(self.max_num_seqs, self.adaptive_cap + 1)
