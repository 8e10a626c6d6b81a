"""Completion: everything a finished request produced, for submit()/poll() and asyncio."""

from __future__ import annotations

from dataclasses import dataclass

from choral.executor.job import Job
from choral.executor.request import Timing
from choral.finish import FinishReason

Logprob = tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True)
class SequenceOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[Logprob] | None
    # Sum of the generated tokens' logprobs (with logprobs or best_of > n), or a beam's score.
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None  # the end id, stop id or stop string that ended it
    # Speculative decoding: proposed tokens verified for this sequence, and accepted.
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """A finished request (zigllama's BatchResult, with every returned sequence: n samples,
    the n most likely of best_of, or the n best beams)."""

    request_id: int
    client_id: object
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    timing: Timing
    num_cached_tokens: int
    prompt_logprobs: list[Logprob | None] | None = None  # when sampling.prompt_logprobs asks
    num_preemptions: int = 0  # times the request's sequences were preempted (and recomputed)

    @property
    def num_proposed_tokens(self) -> int:
        """Speculative decoding: proposed tokens verified, over the returned sequences."""
        return sum(o.num_proposed_tokens for o in self.outputs)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(o.num_accepted_tokens for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason:
        return self.outputs[0].finish_reason

    @property
    def latency_s(self) -> float | None:
        return self.timing.latency

    @property
    def queue_time_s(self) -> float | None:
        return self.timing.queue_time


def build_completion(job: Job) -> Completion:
    params = job.request.sampling
    outputs = []
    for index, seq in enumerate(job.returned):
        assert seq.finisher is not None
        tokens = seq.output_token_ids
        text = seq.finisher.text
        if not job.request.exclude_input_from_output:
            tokens = job.prompt_token_ids + tokens
            text = (job.prompt_text or "") + text
        logprobs = list(seq.output_logprobs) if params.logprobs is not None else None
        ranked = job.ranked or job.beam is not None
        cumulative = seq.cumulative_logprob if params.logprobs is not None or ranked else None
        spec = seq.spec
        outputs.append(SequenceOutput(index, list(tokens), text, seq.finish, logprobs, cumulative,
                                      seq.finisher.stop_reason, spec.num_proposed if spec else 0,
                                      spec.num_accepted if spec else 0))
    root = job.root
    return Completion(job.request_id, job.request.client_id, job.prompt_token_ids, outputs, job.timing,
                      root.num_cached_tokens,
                      prompt_logprobs=list(root.prompt_logprobs) if params.prompt_logprobs is not None else None,
                      num_preemptions=sum(s.num_preemptions for s in job.sequences))
