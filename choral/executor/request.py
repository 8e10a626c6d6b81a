"""Requests in, responses out: the executor's public data types (TensorRT-LLM's shape)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from choral.engine.soft_prompt import SoftPrompt
from choral.errors import InvalidRequestError
from choral.finish.reason import FinishReason
from choral.sampling.params import SamplingParams, as_int, as_number, as_tuple, show


@dataclass(frozen=True)
class Request:
    """One generation request.

    Sampling and most stop conditions (temperature, top-p, stop strings, stop token ids,
    min_tokens, logprobs...) live in ``sampling``. The fields here are per request:

    Attributes:
        prompt: text, token ids, or chat messages (rendered with the model's chat template).
        max_tokens: overrides ``sampling.max_tokens`` when given.
        streaming: deliver a response per new token (deltas) instead of one at the end.
        priority: higher runs first; equal priorities are FIFO; waiting requests age upwards.
        allotted_time: seconds from arrival; past it the request ends with TIMED_OUT.
        end_id: an extra end-of-sequence token id (TRT-LLM's ``end_id``).
        stop_words: token sequences that end generation (kept in the output, as TRT-LLM does).
        n: independent sequences sampled from one prompt; the prompt's KV is shared by fork
            (``sampling.best_of`` samples more and returns the n most likely; ``sampling.beam_width``
            runs beam search and returns the n best beams: both final-only, never streamed).
        exclude_input_from_output: False prepends the prompt tokens to the (non-streamed) output.
        client_id: an opaque id echoed in every response.
        callback: called with each Response for this request (from the executor's thread).
        lora: the name of a loaded LoRA adapter to run with (docs/lora.md); None: the base model.
        soft_prompt: a :class:`~choral.engine.soft_prompt.SoftPrompt` whose vectors replace the
            prompt's placeholder positions (or go first): prompt tuning, prompt embeddings.
    """

    prompt: str | Sequence[int] | Sequence[dict[str, Any]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    streaming: bool = False
    priority: float = 0.0
    allotted_time: float | None = None
    end_id: int | None = None
    stop_words: tuple[tuple[int, ...], ...] = ()
    n: int = 1
    exclude_input_from_output: bool = True
    client_id: Any = None
    callback: Callable[[Response], None] | None = None
    lora: str | None = None
    soft_prompt: SoftPrompt | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingParams):
            raise InvalidRequestError("sampling: must be a SamplingParams")
        # Numbers are normalized as they are checked (numpy integers become int), as in SamplingParams.
        if self.max_tokens is not None:
            object.__setattr__(self, "max_tokens", as_int("max_tokens", self.max_tokens, low=1))
        priority = as_number("priority", self.priority, low=-math.inf, finite=False)
        if not math.isfinite(priority):
            raise InvalidRequestError(f"priority: must be a finite number, got {show(self.priority)}")
        object.__setattr__(self, "priority", priority)
        if self.allotted_time is not None:
            seconds = as_number("allotted_time", self.allotted_time, low=0.0, low_open=True, finite=False)
            if not math.isfinite(seconds):
                raise InvalidRequestError(f"allotted_time: must be a finite number of seconds, got "
                                          f"{show(self.allotted_time)}; use None for no limit")
            object.__setattr__(self, "allotted_time", seconds)
        object.__setattr__(self, "n", as_int("n", self.n, low=1, high=64))
        words = []
        for w in as_tuple("stop_words", self.stop_words, "token id lists"):
            ids = tuple(w) if isinstance(w, list | tuple) else ()
            if not ids:
                raise InvalidRequestError(f"stop_words: each must be a non-empty list of token ids, got {show(w)}")
            words.append(tuple(as_int("stop_words", t, low=0) for t in ids))
        object.__setattr__(self, "stop_words", tuple(words))
        if self.end_id is not None:
            object.__setattr__(self, "end_id", as_int("end_id", self.end_id, low=0))
        if self.callback is not None and not callable(self.callback):
            raise InvalidRequestError("callback: must be callable")
        if self.soft_prompt is not None and not isinstance(self.soft_prompt, SoftPrompt):
            raise InvalidRequestError(f"soft_prompt: must be a SoftPrompt or None, got "
                                      f"{type(self.soft_prompt).__name__}")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise InvalidRequestError(f"lora: must be an adapter name (a non-empty string) or None, got "
                                      f"{show(self.lora)}")

    @property
    def effective_max_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else self.sampling.max_tokens


@dataclass
class Timing:
    """Seconds, measured on the executor's monotonic clock."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclass
class Result:
    """What one response carries for one sequence of a request."""

    is_final: bool  # the whole request is done (every sequence)
    is_sequence_final: bool
    sequence_index: int
    output_token_ids: list[int]  # deltas when streaming, else everything
    text: str  # likewise
    finish_reason: FinishReason
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None
    num_prompt_tokens: int
    num_output_tokens: int  # so far, for this sequence
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    timing: Timing
    # Sum of the generated tokens' logprobs (with logprobs or best_of > n), or a beam's score.
    cumulative_logprob: float | None = None
    # Speculative decoding, for this sequence so far: proposed tokens verified, and accepted.
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class Response:
    """A response for request ``request_id``: an error or a result."""

    request_id: int
    client_id: Any = None
    result: Result | None = None
    error: str | None = None
    # The exception behind ``error`` (a SamplingError: the request's own settings), when there was one.
    error_cause: Exception | None = field(default=None, repr=False, compare=False)

    @property
    def has_error(self) -> bool:
        return self.error is not None
