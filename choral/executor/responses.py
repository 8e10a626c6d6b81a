"""Responses: what a request hands back while it streams and when it ends.

A plain request answers per sequence: a delta per token when streaming, else one result per
sequence as it finishes. best_of > n and beam search answer once, at the end: the n most likely
samples, or the n best beams, become the request's ``returned`` sequences, indexed 0..n-1.
Ending a request (finish, cancel, timeout) frees its blocks here too, through the scheduler.
"""

from __future__ import annotations

import dataclasses
import time

from choral.executor.intake import Intake
from choral.executor.job import ExecSequence, Job
from choral.executor.request import Response, Result
from choral.executor.scheduler import Scheduler
from choral.executor.stats import AggregateStats
from choral.finish import FinishReason

_RUNNING = FinishReason.NOT_FINISHED  # a sequence not ended yet


class Responder:
    """Builds the Responses of the current step (``pending``) and ends requests."""

    def __init__(self, scheduler: Scheduler, intake: Intake, aggregate: AggregateStats):
        self.scheduler = scheduler
        self.intake = intake
        self.aggregate = aggregate
        self.pending: list[tuple[Job, Response, bool]] = []  # (job, response, request done)

    # ---- sequences and requests end --------------------------------------------------------
    def stream(self, seq: ExecSequence) -> None:
        """A sequence of a streaming request took a token: send what is new."""
        self._respond(seq, seq.index, final=False, all_final=False)

    def finish_sequence(self, seq: ExecSequence, reason: FinishReason) -> None:
        """A sample ended: free its blocks and answer (best_of: once every sample has ended)."""
        seq.finish = reason
        self.scheduler.remove(seq)
        job = seq.job
        assert job is not None
        every = (job.forked or job.num_samples == 1) and all(s.finish is not _RUNNING for s in job.sequences)
        if job.ranked:
            if every:  # the n most likely of the samples, by cumulative logprob (vLLM's best_of)
                ranked = sorted(job.sequences, key=lambda s: -s.cumulative_logprob)
                self._return(job, ranked[: job.request.sampling.n])
            return
        if every:
            job.returned = sorted(job.sequences, key=lambda s: s.index)
        self._respond(seq, seq.index, final=True, all_final=every)

    def finish_beams(self, job: Job, reason: FinishReason | None = None) -> None:
        """Free every beam and return the n best: finished hypotheses when the search is over
        (``reason`` None), else the best running beams, ending with ``reason``."""
        group = job.beam
        assert group is not None
        for seq in group.live:
            self.scheduler.remove(seq)
        params = job.request.sampling
        n = params.n
        if reason is None:  # a hypothesis ends on an end token or at the length limit
            ends = job.stop_conditions.token_reason
            hypotheses = [(tokens, score, (ends(tokens[-1]) if tokens else None) or FinishReason.LENGTH)
                          for tokens, score in group.search.results(n)]
        else:
            hypotheses = [(tokens, score, reason) for tokens, score in group.search.best_running(n)]
        self._return(job, [self.intake.output_sequence(job, i, tokens, why, score)
                           for i, (tokens, score, why) in enumerate(hypotheses)])

    def end_job(self, job: Job, reason: FinishReason) -> None:
        """Cancel or time out a request: every sequence ends with what it has so far."""
        if job.beam is not None:
            self.finish_beams(job, reason)
            return
        if not job.forked and job.num_samples > 1:
            # Samples not forked yet end too, with nothing generated.
            for index in range(1, job.num_samples):
                job.sequences.append(self.intake.new_sequence(job, index, job.prompt_token_ids))
            job.forked = True
        for seq in list(job.sequences):
            if seq.finish is _RUNNING:
                self.finish_sequence(seq, reason)

    def fail_job(self, job: Job, message: str, cause: Exception | None = None) -> None:
        """The request cannot go on (its logits processor raised...): free every block it holds
        and answer once with the error (``cause``: the exception behind it). Nothing else is touched."""
        job.error, job.error_cause = message, cause
        live = list(job.beam.live) if job.beam is not None else []
        for seq in [*job.sequences, *live]:
            if seq.finish is _RUNNING:
                seq.finish = FinishReason.CANCELLED
            self.scheduler.remove(seq)
        job.timing.finished = time.monotonic()
        agg = self.aggregate
        agg.total_requests += 1
        agg.failed += 1
        agg.total_prompt_tokens += len(job.prompt_token_ids)
        agg.total_preemptions += sum(s.num_preemptions for s in job.sequences)
        agg.sum_latency_s += job.timing.latency or 0.0
        agg.sum_queue_time_s += job.timing.queue_time or 0.0
        self.pending.append((job, Response(job.request_id, job.request.client_id, error=message,
                                                  error_cause=cause), True))

    # ---- building responses ----------------------------------------------------------------
    def _return(self, job: Job, returned: list[ExecSequence]) -> None:
        """The request is over: answer once per returned sequence, the last one final."""
        job.returned = returned
        for i, seq in enumerate(returned):
            self._respond(seq, i, final=True, all_final=i == len(returned) - 1)

    def _respond(self, seq: ExecSequence, index: int, final: bool, all_final: bool) -> None:
        job = seq.job
        assert job is not None and seq.finisher is not None
        request = job.request
        if all_final:
            job.timing.finished = time.monotonic()
        text = seq.finisher.flush() if final else seq.finisher.delta()
        wants_logprobs = seq.params.logprobs is not None
        if request.streaming:
            tokens = seq.output_token_ids[seq.sent_tokens :]
            logprobs = seq.output_logprobs[seq.sent_logprobs :] if wants_logprobs else None
        else:
            tokens = seq.output_token_ids
            logprobs = seq.output_logprobs if wants_logprobs else None
            if not request.exclude_input_from_output:
                tokens = job.prompt_token_ids + tokens
                text = (job.prompt_text or "") + text
        seq.sent_tokens = seq.num_output_tokens
        seq.sent_logprobs = len(seq.output_logprobs)
        cumulative = seq.cumulative_logprob if (wants_logprobs or job.ranked or job.beam is not None) else None
        result = Result(
            is_final=all_final, is_sequence_final=final, sequence_index=index, output_token_ids=list(tokens),
            text=text, finish_reason=seq.finish, logprobs=list(logprobs) if logprobs is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens, cumulative_logprob=cumulative,
            num_proposed_tokens=seq.spec.num_proposed if seq.spec is not None else 0,
            num_accepted_tokens=seq.spec.num_accepted if seq.spec is not None else 0,
            timing=dataclasses.replace(job.timing),  # as of this response: later ones fill in more
        )
        if all_final:
            self._account(job)
        self.pending.append((job, Response(job.request_id, request.client_id, result=result), all_final))

    def _account(self, job: Job) -> None:
        agg = self.aggregate
        agg.total_requests += 1
        reasons = {s.finish for s in job.returned}
        if FinishReason.CANCELLED in reasons:
            agg.cancelled += 1
        elif FinishReason.TIMED_OUT in reasons:
            agg.timed_out += 1
        else:
            agg.completed += 1
        agg.total_prompt_tokens += len(job.prompt_token_ids)
        agg.total_cached_prompt_tokens += job.root.num_cached_tokens
        agg.total_output_tokens += sum(s.num_output_tokens for s in job.returned)
        agg.total_preemptions += sum(s.num_preemptions for s in job.sequences)
        agg.total_draft_tokens += sum(s.spec.num_proposed for s in job.sequences if s.spec is not None)
        agg.total_accepted_tokens += sum(s.spec.num_accepted for s in job.sequences if s.spec is not None)
        t = job.timing
        agg.sum_latency_s += t.latency or 0.0
        agg.sum_queue_time_s += t.queue_time or 0.0
        if t.time_to_first_token is not None:
            agg.sum_ttft_s += t.time_to_first_token
            agg.num_with_first_token += 1
