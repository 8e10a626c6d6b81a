"""One scheduled step on the engine core: ``plan`` turns the scheduler's output into a StepPlan
(plain data), the core runs it, and ``update`` is the one place where sequences then advance:
computed counts, prefix-cache registration, a token for every sequence whose tokens are all
computed, forks, beams, finishes.

Sampled requests draw through the batched sampler; the first time a request's prompt is done,
its other samples (n, best_of) are forked off it and draw from the same logits. Beam-search
requests advance once every live beam has its logits: the processed logprobs go to the beam
search, which forks the sequences that two beams continue and frees those no beam continues.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from choral.engine.step import StepOutput, StepPlan
from choral.executor.intake import Intake
from choral.executor.job import ExecSequence, Job
from choral.executor.responses import Responder
from choral.executor.scheduler import ScheduledStep, Scheduler
from choral.finish import FinishReason
from choral.sampling.sampler import SampleResult
from choral.sampling.token_logprobs import TokenLogprobs
from choral.speculative.speculator import Speculator

logger = logging.getLogger(__name__)


class StepRunner:
    """Runs scheduled steps on the engine core (the caller holds the core's lock)."""

    def __init__(self, engine: LLMEngine, scheduler: Scheduler, intake: Intake, responder: Responder,
                 enable_prefix_cache: bool, speculator: Speculator | None = None):
        self.engine = engine
        self.speculator = speculator or Speculator()
        self._verifying: dict[int, Verification] = {}  # seq id -> its proposal, while this step verifies it
        self.core = engine.core
        self.scheduler = scheduler
        self.intake = intake
        self.responder = responder
        self.enable_prefix_cache = enable_prefix_cache

    def run(self, step: ScheduledStep) -> None:
        """plan -> core.step -> update."""
        plan = self.plan(step)
        self.update(step, plan, self.core.step(plan))

    @staticmethod
    def plan(step: ScheduledStep) -> StepPlan:
        """The forward this step runs: each sequence's next tokens, and which logits to return."""
        chunks = []
        for seq, n in step.items:
            start = seq.num_computed_tokens
            draft = step.drafts.get(seq.seq_id)
            if draft:
                # [last token, *proposal], logits on every row: row i is the next-token logits
                # after proposal[:i], so one forward checks the whole proposal.
                chunks.append(Chunk([seq.token_ids[start], *draft], start, list(seq.block_table), logits="all"))
                continue
            completes = start + n == seq.num_tokens
            wants_prompt_lp = (seq.index == 0 and seq.params.prompt_logprobs is not None
                               and len(seq.prompt_logprobs) < seq.num_prompt_tokens)
            mode = "all" if wants_prompt_lp else ("last" if completes else "none")
            chunk = Chunk(seq.token_ids[start : start + n], start, list(seq.block_table), logits=mode, lora=seq.lora)
            if seq.soft is not None:
                offsets, rows = seq.soft.rows_in(start, start + n)
                if offsets:
                    chunk.embeds = (offsets, seq.soft.table, rows)
            chunks.append(chunk)
        return StepPlan(chunks, list(step.copies))

    def update(self, step: ScheduledStep, plan: StepPlan, output: StepOutput) -> None:
        """Advance every sequence of the step by what the core computed and sampled."""
        rows: list[torch.Tensor] = []
        to_sample: list[ExecSequence] = []
        beams: dict[int, tuple[Job, dict[int, torch.Tensor]]] = {}  # request id -> (job, {seq_id: logits [V]})
        verifying: list[Verification] = []
        for (seq, n), chunk, logits in zip(step.items, plan.chunks, output.logits, strict=True):
            draft = step.drafts.get(seq.seq_id)
            if draft:
                # Only the last token is surely computed; the proposal's K/V wait for the verdict.
                seq.num_computed_tokens += 1
                assert logits is not None
                assert seq.spec is not None
                seq.spec.num_proposed += len(draft)
                verifying.append(Verification(seq, draft, logits, seq.num_tokens))
                to_sample.append(seq)
                rows.append(logits[0])
                continue
            start = seq.num_computed_tokens
            seq.num_computed_tokens += n
            if self.enable_prefix_cache:
                self.core.kv.register_full_blocks(seq)
            if logits is not None and chunk.logits == "all":
                record_prompt_logprobs(seq, start, logits)
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            assert logits is not None
            job = seq.job
            assert job is not None
            if job.beam is not None:
                beams.setdefault(job.request_id, (job, {}))[1][seq.seq_id] = logits[-1]
                continue
            to_sample.append(seq)
            rows.append(logits[-1])
            if not job.forked and job.num_samples > 1:  # n / best_of: the others share this prompt's KV
                for child in self._fork_samples(job, seq):
                    to_sample.append(child)
                    rows.append(logits[-1])
        for job, logits_by_seq in beams.values():
            try:
                self._beam_step(job, logits_by_seq)
            except Exception as e:  # the request's own doing (a logits processor): it alone fails
                self._fail(job, e)
        self._verifying = {v.seq.seq_id: v for v in verifying}
        if to_sample:
            self._sample(to_sample, rows)
        if verifying:
            step.num_accepted_tokens = self._verify(verifying)

    def _verify(self, verifying: list[Verification]) -> int:
        """Finish the speculating sequences, whose row 0 was drawn with the batch. Returns the
        proposed tokens accepted.

        Depth by depth, batched over the sequences still going: the token drawn from row i is
        the sequence's next token exactly as plain decoding draws it (same logits up to float
        rounding, same processors, penalties, grammar and generator: one draw per token), so
        greedy output is the same token for token and sampled output has the target's
        distribution. For a proposal that is one fixed token this *is* rejection sampling:
        proposal[i] is accepted with probability p(proposal[i]), and on rejection the drawn
        token follows p without it, renormalised. While the drawn token equals proposal[i],
        row i + 1 is valid (its K/V saw exactly these tokens); the first mismatch, an end, or the
        bonus token after a wholly accepted proposal stops the sequence."""
        live = verifying
        for depth in range(max(len(v.draft) for v in verifying) + 1):
            # Going on: the token drawn at this depth was proposal[depth] (see Verification.take).
            going = [v for v in live if v.accepted == depth + 1 and v.seq.finish is FinishReason.NOT_FINISHED]
            if not going:
                break
            self._sample([v.seq for v in going], [v.logits[depth + 1] for v in going])
            live = going
        total = 0
        for v in verifying:
            seq = v.seq
            assert seq.spec is not None
            self.speculator.record(seq.spec, len(v.draft), v.accepted)
            total += v.accepted
            if seq.finish is not FinishReason.NOT_FINISHED:
                continue  # ended: its blocks are already freed
            # The accepted tokens' K/V stay; the rejected ones go (blocks left empty are freed).
            keep = v.base + v.accepted
            self.core.kv.truncate(seq, keep)
            seq.num_computed_tokens = keep
            if self.enable_prefix_cache:
                self.core.kv.register_full_blocks(seq)
            assert seq.job is not None
            if seq.job.request.streaming:
                self.responder.stream(seq)
        self._verifying = {}
        return total

    def _fail(self, job: Job, error: Exception) -> None:
        logger.warning("request %d failed: %r", job.request_id, error)
        self.responder.fail_job(job, f"{type(error).__name__}: {error}", error)

    # ---- forks -----------------------------------------------------------------------------
    def _fork(self, job: Job, parent: ExecSequence, index: int) -> ExecSequence:
        child = self.intake.new_sequence(job, index, parent.token_ids)
        self.core.kv.fork(parent, child)
        child.num_cached_tokens = parent.num_cached_tokens
        self.scheduler.running.append(child)
        return child

    def _fork_samples(self, job: Job, parent: ExecSequence) -> list[ExecSequence]:
        children = [self._fork(job, parent, index) for index in range(1, job.num_samples)]
        job.sequences.extend(children)
        job.forked = True
        return children

    def _fork_beam(self, job: Job, parent: ExecSequence) -> ExecSequence:
        job.num_forks += 1
        return self._fork(job, parent, job.num_forks)

    # ---- sampling ----------------------------------------------------------------------------
    def _draw(self, seqs: list[ExecSequence], rows: list[torch.Tensor]) -> SampleResult:
        ranked = [s.job is not None and s.job.ranked for s in seqs]  # best_of ranks by cumulative logprob
        return self.core.sample(torch.stack(rows), seqs, ranked)

    def _sample(self, seqs: list[ExecSequence], rows: list[torch.Tensor]) -> None:
        try:
            drawn = [(seqs, self._draw(seqs, rows))]
        except Exception:
            # Someone's logits processor (or grammar) raised. Draw request by request so only
            # the requests that raise fail: the processors run before anything is drawn or any
            # grammar advances, so the others sample exactly as they would have.
            drawn = []
            by_job: dict[int, list[int]] = {}
            for i, seq in enumerate(seqs):
                assert seq.job is not None
                by_job.setdefault(seq.job.request_id, []).append(i)
            for indices in by_job.values():
                mine = [seqs[i] for i in indices]
                try:
                    drawn.append((mine, self._draw(mine, [rows[i] for i in indices])))
                except Exception as e:
                    assert mine[0].job is not None
                    self._fail(mine[0].job, e)
        for group, result in drawn:
            self._take(group, result)

    def _take(self, seqs: list[ExecSequence], result: SampleResult) -> None:
        """Append each sequence's drawn token; end the ones that stop, stream the others."""
        now = time.monotonic()
        for seq, token, lp in zip(seqs, result.token_ids, result.logprobs, strict=True):
            job = seq.job
            assert job is not None and seq.finisher is not None
            if job.timing.first_token is None:
                job.timing.first_token = now
            seq.token_ids.append(token)
            verification = self._verifying.get(seq.seq_id)
            if verification is not None:  # before the stop checks: a final Result counts it
                verification.take(token)
            if lp is not None:
                seq.cumulative_logprob += lp[0]
                if seq.params.logprobs is not None:
                    seq.output_logprobs.append(lp)
            reason = seq.finisher.add(token)
            if reason is not FinishReason.NOT_FINISHED:
                self.responder.finish_sequence(seq, reason)
            elif job.request.streaming and seq.seq_id not in self._verifying:
                self.responder.stream(seq)

    # ---- beam search -------------------------------------------------------------------------
    def _beam_step(self, job: Job, logits_by_seq: dict[int, torch.Tensor]) -> None:
        """Advance a beam request once every live beam has its logits this step."""
        group = job.beam
        assert group is not None
        live = group.live
        if any(seq.seq_id not in logits_by_seq for seq in live):
            # A beam missed this step (budget, or no block free without preempting): the others
            # recompute their last token next step, so the beams stay in step.
            for seq in live:
                if seq.seq_id in logits_by_seq:
                    seq.num_computed_tokens -= 1
            return
        if job.timing.first_token is None:
            job.timing.first_token = time.monotonic()
        processed = self.core.process(torch.stack([logits_by_seq[s.seq_id] for s in live]), live)
        logprobs = dict(zip([s.seq_id for s in live], processed.log_softmax(-1), strict=True))  # {seq_id: [V]}
        _, dropped = group.advance(logprobs, lambda parent: self._fork_beam(job, parent))
        for seq in dropped:
            self.scheduler.remove(seq)
        if group.search.done:
            self.responder.finish_beams(job)


@dataclass(eq=False)
class Verification:
    """A speculating sequence in this step's update: its proposal, the chunk's logits
    ([1 + len(draft), V]) and ``base``, its token count before this step's tokens."""

    seq: ExecSequence
    draft: list[int]
    logits: torch.Tensor
    base: int
    accepted: int = 0

    def take(self, token: int) -> None:
        """The sequence just appended ``token``: count it if it is the next proposed token."""
        depth = self.seq.num_tokens - self.base - 1
        if depth == self.accepted < len(self.draft) and token == self.draft[depth]:
            self.accepted += 1
            assert self.seq.spec is not None
            self.seq.spec.num_accepted += 1


def record_prompt_logprobs(seq: ExecSequence, start: int, logits: torch.Tensor) -> None:
    """Logprobs of the prompt tokens in this chunk (logits [n, V] of positions start..start+n-1)."""
    # Row j predicts token start + j + 1; the first prompt token has no logprob.
    if not seq.prompt_logprobs:
        seq.prompt_logprobs.append(None)
    top = seq.params.prompt_logprobs or 0
    logp = logits.log_softmax(-1)
    for j in range(logits.shape[0]):
        target = start + j + 1
        if target >= seq.num_prompt_tokens or len(seq.prompt_logprobs) > target:
            continue
        tok = seq.token_ids[target]
        tops: list[tuple[int, float]] = []
        if top:
            vals, ids = logp[j].topk(top)
            tops = list(zip(ids.tolist(), vals.tolist(), strict=True))
        value = logp[j, tok]
        seq.prompt_logprobs.append(TokenLogprobs(float(value), tops, int((logp[j] > value).sum()) + 1))
