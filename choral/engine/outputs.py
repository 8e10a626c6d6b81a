"""Results handed back to users (vLLM-shaped)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from choral.engine.sequence import Sequence
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


def request_output(seq: Sequence, request_id: str, prompt: str | None, tokenizer: Tokenizer | None,
                   eos_token_ids: Seq[int]) -> RequestOutput:
    """The request rooted at ``seq``: its samples (best_of: the n most likely) or its beams."""
    params = seq.params
    if seq.beam is not None:
        ends = set(params.stop_token_ids) | set(eos_token_ids)
        outputs = [_completion(params, i, ids, "stop" if ids and ids[-1] in ends else "length", [], score,
                               tokenizer, eos_token_ids)
                   for i, (ids, score) in enumerate(seq.beam.search.results(params.n))]
    else:
        samples = [seq, *seq.forks]
        ranked = len(samples) > params.n
        if ranked:  # best_of: keep the n most likely
            samples = sorted(samples, key=lambda s: -s.cumulative_logprob)[: params.n]
        outputs = [_completion(params, i, s.output_token_ids, s.finish_reason, s.output_logprobs,
                               s.cumulative_logprob if params.logprobs is not None or ranked else None,
                               tokenizer, eos_token_ids)
                   for i, s in enumerate(samples)]
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=seq.prompt_token_ids,
        outputs=outputs,
        prompt_logprobs=seq.prompt_logprobs if params.prompt_logprobs is not None else None,
        metrics={"num_preemptions": float(seq.num_preemptions)},
    )


def _completion(params: SamplingParams, index: int, ids: list[int], finish_reason: str | None,
                logprobs: list[Logprob], cumulative_logprob: float | None, tokenizer: Tokenizer | None,
                eos_token_ids: Seq[int]) -> CompletionOutput:
    stop_reason: int | str | None = None
    if finish_reason == "stop" and ids and ids[-1] in (*params.stop_token_ids, *eos_token_ids):
        stop_reason = ids[-1]
    text = ""
    if tokenizer is not None:
        text = tokenizer.decode(ids, params.skip_special_tokens)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, stop_reason = text[:cut], stop
    return CompletionOutput(index, text, list(ids), finish_reason, stop_reason,
                            logprobs if params.logprobs is not None else None, cumulative_logprob)
