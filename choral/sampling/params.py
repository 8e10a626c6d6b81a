"""SamplingParams: one frozen, validated dataclass shared by every API."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from choral.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 or -1 = all).
        top_p: keep the smallest set whose probability reaches top_p (1 = all).
        min_p: drop tokens whose probability is below min_p times the top one (0 = none).
        seed: a per-request seed; the same seed gives the same tokens whatever the batch.
        max_tokens: tokens to generate at most (the context limit also stops generation).
        min_tokens: end-of-sequence tokens and stop ids are masked until this many are generated.
        stop_token_ids: extra token ids that end generation (the model's EOS always does,
            unless ignore_eos).
        stop: strings that end generation; the output is cut before the match.
        ignore_eos: keep generating past EOS (benchmarks).
        logprobs: return the log-probability of each generated token and the top-n alternatives.
        prompt_logprobs: return the log-probability of each prompt token (and top-n).
        skip_special_tokens: leave special tokens out of the decoded text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default=())
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _number("temperature", self.temperature, low=0.0)
        _integer("top_k", self.top_k, low=-1)
        _number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _integer("seed", self.seed, low=0)
        _integer("max_tokens", self.max_tokens, low=1)
        _integer("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens: {self.min_tokens} is larger than max_tokens {self.max_tokens}"
            )
        for t in self.stop_token_ids:
            _integer("stop_token_ids", t, low=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop: every stop string must be a non-empty str, got {s!r}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, low=0, high=20)
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, low=0, high=20)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SamplingParams:
        """Build from a dict, rejecting unknown keys with a message that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)


def _number(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidRequestError(f"{name}: must be a number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high if high is not None else 'inf'}]"
        raise InvalidRequestError(f"{name}: {value} is outside {bound}")


def _integer(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name}: must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        raise InvalidRequestError(f"{name}: {value} is outside [{low}, {high if high is not None else 'inf'}]")
