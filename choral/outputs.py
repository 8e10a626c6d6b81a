"""Results handed back to users (vLLM-shaped)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from choral.finish import FinishReason

if TYPE_CHECKING:
    from choral.executor.completion import Completion
    from choral.sampling.params import SamplingParams
    from choral.tokenizer import Tokenizer

TokenLogprobs = tuple[float, list[tuple[int, float]]]  # the executor's form: (logprob, top-n (token, logprob))


@dataclass
class Logprob:
    """vLLM's per-token logprob entry: its value, its rank among all tokens (1 = most likely) and
    its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]  # per generated token: the chosen token and the top-n
PromptLogprobs = list[dict[int, Logprob] | None]  # per prompt token; the first is None


@dataclass
class RequestMetrics:
    """When the request arrived, was first scheduled, produced its first and last token and
    finished (wall-clock ``time.time()`` seconds, as vLLM reports them; None if it never got there)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None
    num_preemptions: int = 0  # times the request's sequences were preempted (and recomputed)
    # Speculative decoding over the returned sequences: proposed tokens verified, and accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop id or stop string), "length", "abort" (FinishReason.api_name)
    # The stop token id or stop string that ended it; None for EOS or any other end (as vLLM).
    stop_reason: int | str | None = None
    logprobs: SampleLogprobs | None = None
    # Sum of the generated tokens' logprobs (best_of, logprobs) or the beam's final score.
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything one prompt produced."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


def request_output(completion: Completion, request_id: str, prompt: str | None, params: SamplingParams,
                   tokenizer: Tokenizer | None = None) -> RequestOutput:
    """A finished executor request as LLM.generate returns it: its samples (best_of: the n most
    likely) or its beams, with their text (cut before a stop string), finish and stop reasons, and
    logprobs in vLLM's form (``tokenizer`` spells each entry's ``decoded_token``)."""
    spell = _Speller(tokenizer)
    # vLLM's stop_reason: the stop string or stop token id; None when an end id (EOS) ended it.
    outputs = [CompletionOutput(out.index, out.text, list(out.token_ids), out.finish_reason.api_name,
                                None if out.finish_reason is FinishReason.END_ID else out.stop_reason,
                                _sample_logprobs(params, out.token_ids, out.logprobs, spell),
                                out.cumulative_logprob)
               for out in completion.outputs]
    prompt_logprobs = None
    if completion.prompt_logprobs is not None:
        prompt_logprobs = [None if entry is None else _logprob_dict(token, entry, spell)
                           for token, entry in zip(completion.prompt_token_ids, completion.prompt_logprobs,
                                                   strict=False)]
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=completion.prompt_token_ids,
        outputs=outputs,
        prompt_logprobs=prompt_logprobs,
        metrics=_metrics(completion),
        num_cached_tokens=completion.num_cached_tokens,
    )


def _metrics(completion: Completion) -> RequestMetrics:
    # The executor times on time.monotonic(); vLLM reports wall-clock times.
    offset = time.time() - time.monotonic()
    timing = completion.timing

    def wall(t: float | None) -> float | None:
        return None if t is None else t + offset

    return RequestMetrics(arrival_time=timing.arrival + offset, first_scheduled_time=wall(timing.first_scheduled),
                          first_token_time=wall(timing.first_token), last_token_time=wall(timing.finished),
                          finished_time=wall(timing.finished), time_in_queue=timing.queue_time,
                          num_preemptions=completion.num_preemptions,
                          num_draft_tokens=completion.num_proposed_tokens,
                          num_accepted_tokens=completion.num_accepted_tokens)


class _Speller:
    """Token id -> its decoded text, cached (logprob dicts spell every top-n token)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self._tok = tokenizer
        self._cache: dict[int, str | None] = {}

    def __call__(self, token_id: int) -> str | None:
        if token_id not in self._cache:
            self._cache[token_id] = None if self._tok is None else self._tok.decode([token_id], False)
        return self._cache[token_id]


def _logprob_dict(token: int, entry: TokenLogprobs, spell: _Speller) -> dict[int, Logprob]:
    """vLLM's form: the chosen token first (with its rank), then the top-n ranked 1..n."""
    value, top = entry
    rank = getattr(entry, "rank", None)
    if rank is None:  # no rank recorded: known only when the token is in the top n
        rank = next((i + 1 for i, (t, _) in enumerate(top) if t == token), None)
    out = {token: Logprob(value, rank, spell(token))}
    for i, (t, v) in enumerate(top):
        if t not in out:
            out[t] = Logprob(v, i + 1, spell(t))
    return out


def _sample_logprobs(params: SamplingParams, ids: list[int], logprobs: list[TokenLogprobs] | None,
                     spell: _Speller) -> SampleLogprobs | None:
    if params.logprobs is None:
        return None
    return [_logprob_dict(t, entry, spell) for t, entry in zip(ids, logprobs or [], strict=False)]
