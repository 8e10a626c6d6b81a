"""Results handed back to users (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from choral.executor.completion import Completion
    from choral.sampling.params import SamplingParams

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen token's logprob, top-n (token, logprob))


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop id or stop string), "length", "abort" (FinishReason.api_name)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[Logprob] | None = None
    # Sum of the generated tokens' logprobs (best_of, logprobs) or the beam's final score.
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """Everything one prompt produced."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[Logprob | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def request_output(completion: Completion, request_id: str, prompt: str | None,
                   params: SamplingParams) -> RequestOutput:
    """A finished executor request as LLM.generate returns it: its samples (best_of: the n most
    likely) or its beams, with their text (cut before a stop string), finish and stop reasons."""
    want_logprobs = params.logprobs is not None
    outputs = [CompletionOutput(out.index, out.text, list(out.token_ids), out.finish_reason.api_name,
                                out.stop_reason, (out.logprobs or []) if want_logprobs else None,
                                out.cumulative_logprob)
               for out in completion.outputs]
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=completion.prompt_token_ids,
        outputs=outputs,
        prompt_logprobs=completion.prompt_logprobs,
        metrics={"num_preemptions": float(completion.num_preemptions)},
    )
