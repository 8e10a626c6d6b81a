"""Results handed back to users (vLLM-shaped)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from choral.executor.completion import Completion
    from choral.sampling.params import SamplingParams
    from choral.tokenizer import Tokenizer

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


def request_output(completion: Completion, request_id: str, prompt: str | None, params: SamplingParams,
                   tokenizer: Tokenizer | None, eos_token_ids: Seq[int]) -> RequestOutput:
    """A finished executor request as LLM.generate returns it: its samples (best_of: the n most
    likely) or its beams, with vLLM's finish reasons and text cut at the first stop string."""
    outputs = [_completion(params, out.index, out.token_ids, _FINISH_REASONS.get(out.finish_reason.value),
                           out.logprobs or [], out.cumulative_logprob, tokenizer, eos_token_ids)
               for out in completion.outputs]
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=completion.prompt_token_ids,
        outputs=outputs,
        prompt_logprobs=completion.prompt_logprobs,
        metrics={"num_preemptions": float(completion.num_preemptions)},
    )


# The executor's FinishReason values -> vLLM's finish_reason (cancelled / timed out: None).
_FINISH_REASONS = {"end_id": "stop", "stop_words": "stop", "length": "length"}


def _completion(params: SamplingParams, index: int, ids: list[int], finish_reason: str | None,
                logprobs: list[Logprob], cumulative_logprob: float | None, tokenizer: Tokenizer | None,
                eos_token_ids: Seq[int]) -> CompletionOutput:
    stop_reason: int | str | None = None
    if finish_reason == "stop" and ids and ids[-1] in (*params.stop_token_ids, *eos_token_ids):
        stop_reason = ids[-1]
    text = ""
    if tokenizer is not None:
        text = tokenizer.decode(ids, params.skip_special_tokens)
        # As in the executor, a stop string counts only if it ends in text from the min_tokens-th token on.
        floor = len(tokenizer.decode(ids[: params.min_tokens - 1], params.skip_special_tokens)) \
            if params.stop and params.min_tokens > 1 else 0
        for stop in params.stop:
            cut = text.find(stop, max(0, floor - len(stop) + 1))
            if cut >= 0:
                text, stop_reason = text[:cut], stop
    return CompletionOutput(index, text, list(ids), finish_reason, stop_reason,
                            logprobs if params.logprobs is not None else None, cumulative_logprob)
