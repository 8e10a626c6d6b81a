"""Results handed back to users (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen token's logprob, top-n (token, logprob))


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop id or stop string), "length", or None
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
