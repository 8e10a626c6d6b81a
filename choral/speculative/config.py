"""SpeculativeConfig: which proposer a request speculates with, and how far (frozen, validated).

A request asks with ``SamplingParams(speculative={"method": "ngram", "k": 4})`` (a dict or a
SpeculativeConfig); an executor's default is ``ExecutorConfig(speculative=...)`` (``choral serve
--speculative ngram --spec-k 4``) and applies to requests that say nothing. ``{"method": "off"}``
turns a default off for one request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from choral.errors import InvalidRequestError

METHODS = ("ngram", "draft", "off")
MAX_K = 16  # proposals per step: beyond this the rejected tail of a chunk costs more than it saves


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a sequence speculates.

    Attributes:
        method: "ngram" (prompt lookup: continue the latest earlier occurrence of the
            sequence's last n tokens), "draft" (the engine's draft model proposes its argmax
            tokens; the engine must have one: EngineConfig.draft_model) or "off".
        k: the most tokens proposed per step (1..16).
        ngram_min / ngram_max: the n-gram lengths matched, longest first (1 <= min <= max <= 16).
        p_min: draft only: the draft's proposal ends at the first token it gives a probability
            below this (llama.cpp's --draft-p-min), in [0, 1).
        model: draft only: the draft model's name or path (vLLM's ``model`` key). In an engine's
            default (LLM's speculative_config) it loads that draft model; in a request it must
            name the engine's draft model, or be left out.
        adaptive: shrink k per sequence while its proposals are rejected (down to off for a
            while), and verify a proposal only when the measured cost of the step's extra
            tokens is expected to pay off, so speculation never costs much on text that does not
            repeat or on hardware where extra tokens are not nearly free. False: always verify
            up to k tokens (tests, measurements).
    """

    method: str = "ngram"
    k: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    adaptive: bool = True
    p_min: float = 0.75
    model: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InvalidRequestError(f"speculative.method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check_int("k", self.k, 1, MAX_K)
        _check_int("ngram_min", self.ngram_min, 1, 16)
        _check_int("ngram_max", self.ngram_max, 1, 16)
        if self.ngram_min > self.ngram_max:
            raise InvalidRequestError(
                f"speculative.ngram_min: {self.ngram_min} is larger than ngram_max {self.ngram_max}")
        if not isinstance(self.adaptive, bool):
            raise InvalidRequestError(f"speculative.adaptive: must be a bool, got {self.adaptive!r}")
        if isinstance(self.p_min, bool) or not isinstance(self.p_min, int | float) or not 0 <= self.p_min < 1:
            raise InvalidRequestError(f"speculative.p_min: must be a number in [0, 1), got {self.p_min!r}")
        if self.model is not None:
            if not isinstance(self.model, str) or not self.model:
                raise InvalidRequestError(f"speculative.model: must be a model name or path, got {self.model!r}")
            if self.method != "draft":
                raise InvalidRequestError(f"speculative.model: a draft model goes with method 'draft', "
                                          f"not {self.method!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    @classmethod
    def coerce(cls, value: Any) -> SpeculativeConfig:
        """A SpeculativeConfig, a dict of its fields, or a method name ("ngram", "draft", "off")."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if not isinstance(value, Mapping):
            raise InvalidRequestError(
                f"speculative: must be a dict like {{'method': 'ngram', 'k': 4}}, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        options: dict[str, Any] = {}
        for key, item in value.items():
            name = _VLLM_NAMES.get(key, key)
            if name not in known:
                raise InvalidRequestError(f"speculative: unknown option {str(key)!r}; known: "
                                          f"{', '.join(sorted(known | set(_VLLM_NAMES)))}")
            if name in options:
                raise InvalidRequestError(f"speculative: {name} given twice (as {key!r} and its other name)")
            options[name] = item
        if "model" in options and "method" not in options:
            options["method"] = "draft"  # vLLM's {"model": ..., "num_speculative_tokens": ...}
        return cls(**options)


# vLLM's speculative_config keys, accepted as the same settings.
_VLLM_NAMES = {"num_speculative_tokens": "k", "prompt_lookup_min": "ngram_min", "prompt_lookup_max": "ngram_max"}


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"speculative.{name}: must be an int in [{low}, {high}], got {value!r}")
