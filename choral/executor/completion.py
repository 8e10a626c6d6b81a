"""Completion: everything a finished request produced, for submit()/poll() and asyncio."""

from __future__ import annotations

from dataclasses import dataclass

from choral.executor.job import Job
from choral.executor.request import FinishReason, Timing


@dataclass(frozen=True)
class SequenceOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None


@dataclass(frozen=True)
class Completion:
    """A finished request (zigllama's BatchResult, with every sequence of ``n``)."""

    request_id: int
    client_id: object
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    timing: Timing
    num_cached_tokens: int

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


def build_completion(job: Job, prompt_text: str | None) -> Completion:
    outputs = []
    for seq in sorted(job.sequences, key=lambda s: s.index):
        assert seq.detok is not None
        tokens = seq.output_token_ids
        text = seq.detok.text
        if not job.request.exclude_input_from_output:
            tokens = job.prompt_token_ids + tokens
            text = (prompt_text or "") + text
        logprobs = list(seq.output_logprobs) if seq.params.logprobs is not None else None
        outputs.append(SequenceOutput(seq.index, list(tokens), text, seq.finish, logprobs))
    return Completion(job.request_id, job.request.client_id, job.prompt_token_ids, outputs, job.timing,
                      job.sequences[0].num_cached_tokens)
