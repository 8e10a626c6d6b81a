"""SamplingParams: one frozen, validated dataclass shared by every API."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from choral.errors import InvalidRequestError
from choral.sampling.guided import StructuredOutputsParams, as_structured, to_constraint
from choral.speculative.config import SpeculativeConfig

MAX_LOGPROBS = 20
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes seeds in [0, 2**64)
# The largest value of every other integer field: token ids, counts and lengths reach torch as
# int64 (or index a tensor), and no vocabulary, context or sample count comes near 2**31, so a
# larger value is a mistake, refused here rather than overflowing inside the loop.
MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. See docs/sampling.md for each knob.

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 or -1 = all).
        top_p: keep the smallest set whose probability reaches top_p (1 = all).
        min_p: drop tokens whose probability is below min_p times the top one (0 = none).
        typical_p: locally typical sampling mass (1 = off).
        repetition_penalty: HF/CTRL penalty on every token seen in prompt + output (1 = off).
        presence_penalty: subtracted once from every token already generated (output only).
        frequency_penalty: subtracted once per occurrence of a token in the output (output only).
        no_repeat_ngram_size: never complete an n-gram already in prompt + output (0 = off).
        logit_bias: token id -> value added to its logit; ``-inf`` bans the token.
        bad_words: token-id sequences (or strings, tokenized by the engine) never completed.
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
        n: completions returned per prompt; they share the prompt's KV cache.
        best_of: completions sampled (>= n); the n with the highest cumulative logprob are returned.
        beam_width: > 1 turns on beam search (deterministic; n <= beam_width beams returned).
        length_penalty: beam score = sum of logprobs / length ** length_penalty.
        early_stopping: beam search stops as soon as beam_width hypotheses are finished.
        logits_processors: names of processors registered on the engine, applied in order.
        json_schema: constrain the output to JSON matching this schema (dict or JSON text).
        regex: constrain the output to this regular expression.
        grammar: constrain the output to this EBNF/GBNF grammar (``root ::= ...``) or a Lark grammar.
        structured_outputs: vLLM's ``StructuredOutputsParams`` (json, regex, choice, grammar,
            json_object; a dict works too), turned into json_schema / regex / grammar.
        guided_decoding: vLLM's older name for ``structured_outputs``.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
        allowed_token_ids: only these token ids may be generated (None = all).
        truncate_prompt_tokens: keep only the last k prompt tokens (None = the whole prompt).
        speculative: speculative decoding for this request (a SpeculativeConfig or a dict such
            as ``{"method": "ngram", "k": 4}``; ``{"method": "off"}`` turns an engine default
            off; None = the engine's default). The output is the same as without it (greedy:
            token for token; sampled: the same distribution, seeded: the same tokens).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    bad_words: tuple[tuple[int, ...] | str, ...] = field(default=())
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default=())
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    n: int = 1
    best_of: int | None = None
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    logits_processors: tuple[str, ...] = field(default=())
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: tuple[int, ...] | None = None
    truncate_prompt_tokens: int | None = None
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        # Values are normalized as they are checked: lists (any iterable) are frozen into tuples,
        # numbers into float and integers (numpy's too) into int; a bool is never a number.
        s = self._set
        self._check_vllm_options()
        # One str is accepted for one stop string / processor name.
        s("stop", as_tuple("stop", (self.stop,) if isinstance(self.stop, str) else self.stop, "str"))
        s("stop_token_ids", tuple(as_int("stop_token_ids", t, low=0)
                                  for t in as_tuple("stop_token_ids", self.stop_token_ids, "token ids")))
        names = self.logits_processors
        s("logits_processors", as_tuple("logits_processors", (names,) if isinstance(names, str) else names, "str"))
        s("temperature", as_number("temperature", self.temperature, low=0.0))
        s("top_k", as_int("top_k", self.top_k, low=-1))
        s("top_p", as_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True))
        s("min_p", as_number("min_p", self.min_p, low=0.0, high=1.0))
        s("typical_p", as_number("typical_p", self.typical_p, low=0.0, high=1.0, low_open=True))
        s("repetition_penalty", as_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True))
        s("presence_penalty", as_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0))
        s("frequency_penalty", as_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0))
        s("no_repeat_ngram_size", as_int("no_repeat_ngram_size", self.no_repeat_ngram_size, low=0))
        self._freeze_logit_bias()
        self._freeze_bad_words()
        s("max_tokens", as_int("max_tokens", self.max_tokens, low=1))
        s("min_tokens", as_int("min_tokens", self.min_tokens, low=0))
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens: {self.min_tokens} is larger than max_tokens {self.max_tokens}"
            )
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise InvalidRequestError(f"stop: every stop string must be a non-empty str, got {show(stop)}")
        if self.logprobs is not None:
            s("logprobs", as_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS))
        if self.prompt_logprobs is not None:
            s("prompt_logprobs", as_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS))
        self._check_fanout()
        self._check_seed()
        for name in self.logits_processors:
            if not isinstance(name, str) or not name:
                raise InvalidRequestError(f"logits_processors: names must be non-empty str, got {show(name)}")
        self._check_structured()
        if self.speculative is not None:
            s("speculative", SpeculativeConfig.coerce(self.speculative))
            if self.speculative.enabled and self.beam_width > 1:
                raise InvalidRequestError("speculative: beam search (beam_width > 1) does not combine with "
                                          "speculative decoding; use {'method': 'off'} or beam_width 1")

    def _check_vllm_options(self) -> None:
        """vLLM's names: structured_outputs / guided_decoding become json_schema / regex / grammar."""
        for name in ("structured_outputs", "guided_decoding"):
            value = getattr(self, name)
            if value is None:
                continue
            given = [n for n in ("json_schema", "regex", "grammar", "structured_outputs", "guided_decoding")
                     if n != name and getattr(self, n) is not None]
            if given:
                raise InvalidRequestError(f"{name}: cannot be combined with {given[0]}")
            structured = as_structured(name, value)
            kind, text = to_constraint(name, structured)
            self._set(name, structured)
            self._set(kind, text)
        if not isinstance(self.include_stop_str_in_output, bool):
            raise InvalidRequestError(
                f"include_stop_str_in_output: must be a bool, got {self.include_stop_str_in_output!r}")
        if self.allowed_token_ids is not None:
            ids = tuple(as_int("allowed_token_ids", t, low=0)
                        for t in as_tuple("allowed_token_ids", self.allowed_token_ids, "token ids"))
            if not ids:
                raise InvalidRequestError("allowed_token_ids: must name at least one token id")
            self._set("allowed_token_ids", tuple(sorted(set(ids))))
        if self.truncate_prompt_tokens is not None:
            self._set("truncate_prompt_tokens", as_int("truncate_prompt_tokens", self.truncate_prompt_tokens, low=1))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_seed(self) -> None:
        if self.seed is None:
            return
        seed = as_int("seed", self.seed, low=0, high=MAX_SEED)
        self._set("seed", seed)
        # Sample i draws from seed + i (beams draw nothing at random); every one must be a seed
        # torch's generators take, or the loop would fail when it forks the sample.
        samples = self.num_samples if self.beam_width == 1 else 1
        if seed + samples - 1 > MAX_SEED:
            why = f"; sample i draws from seed + i, so with {samples} samples" if samples > 1 else ", so"
            raise InvalidRequestError(f"seed: {seed} is too large: seeds must be below 2**64{why} "
                                      f"the seed may be at most {MAX_SEED - samples + 1}")

    def _freeze_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidRequestError(f"logit_bias: must be a mapping token id -> bias, got {show(self.logit_bias)}")
        frozen: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            # JSON objects (the OpenAI API) carry token ids as strings.
            token = as_int("logit_bias", _token_key(key), low=0)
            value = as_number(f"logit_bias: bias of token {token}", bias, low=-math.inf, finite=False)
            if value == math.inf:
                raise InvalidRequestError(f"logit_bias: bias of token {token} is +inf; use a finite value")
            frozen[token] = value
        object.__setattr__(self, "logit_bias", _FrozenDict(frozen))

    def _freeze_bad_words(self) -> None:
        given = (self.bad_words,) if isinstance(self.bad_words, str) else self.bad_words
        words: list[tuple[int, ...] | str] = []
        for word in as_tuple("bad_words", given, "str or token id lists"):
            if isinstance(word, str):
                if not word:
                    raise InvalidRequestError("bad_words: empty string")
                words.append(word)
                continue
            ids = tuple(word) if isinstance(word, list | tuple) else None
            if not ids:
                raise InvalidRequestError(
                    f"bad_words: each entry is a str or a non-empty token id list, got {show(word)}")
            words.append(tuple(as_int("bad_words", t, low=0) for t in ids))
        object.__setattr__(self, "bad_words", tuple(words))

    def _check_fanout(self) -> None:
        self._set("n", as_int("n", self.n, low=1))
        if self.best_of is not None:
            self._set("best_of", as_int("best_of", self.best_of, low=1))
            if self.best_of < self.n:
                raise InvalidRequestError(f"best_of: {self.best_of} is smaller than n {self.n}")
        self._set("beam_width", as_int("beam_width", self.beam_width, low=1))
        self._set("length_penalty", as_number("length_penalty", self.length_penalty, low=-math.inf))
        if not isinstance(self.early_stopping, bool):
            raise InvalidRequestError(f"early_stopping: must be a bool, got {show(self.early_stopping)}")
        if self.beam_width > 1:
            if self.n > self.beam_width:
                raise InvalidRequestError(f"n: {self.n} beams asked of beam_width {self.beam_width}")
            if self.best_of is not None:
                raise InvalidRequestError("best_of: not used with beam search (beam_width > 1)")
            if self.stop or self.json_schema or self.regex or self.grammar:
                raise InvalidRequestError("beam_width: beam search does not combine with stop strings "
                                          "or structured output")

    def _check_structured(self) -> None:
        if isinstance(self.json_schema, Mapping | bool):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema, sort_keys=True))
        given = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidRequestError(f"{given[1]}: only one of json_schema, regex, grammar may be set")
        for name in given:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidRequestError(f"{name}: must be a non-empty string, got {show(value)}")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"json_schema: not valid JSON ({e})") from e

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Sequences generated for this request: best_of (or n), or beam_width."""
        if self.beam_width > 1:
            return self.beam_width
        return self.best_of or self.n

    @property
    def structured(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

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


class _FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes and hashes by content, so SamplingParams stays frozen and hashable."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("logit_bias is frozen")

    __setitem__ = __delitem__ = update = pop = clear = setdefault = popitem = _refuse  # type: ignore[assignment]


# Field checks (shared with the executor's Request): each returns the value normalized, or raises
# InvalidRequestError naming the field.


def _is_bool(value: Any) -> bool:
    """A Python or numpy bool: never accepted as a number, though both behave as one."""
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"


def as_tuple(name: str, value: Any, what: str) -> tuple[Any, ...]:
    """A collection field (a list, tuple or any iterable but a str, bytes or mapping) as a tuple."""
    if isinstance(value, str | bytes | bytearray | Mapping) or not isinstance(value, Iterable):
        raise InvalidRequestError(f"{name}: must be a list of {what}, got {show(value)}")
    return tuple(value)


def as_number(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False,
              finite: bool = True) -> float:
    """``value`` as a float (any real number but a bool, numpy's included), checked against the
    bounds; infinite values are refused unless ``finite`` is False."""
    if _is_bool(value) or not isinstance(value, numbers.Real) or value != value:
        raise InvalidRequestError(f"{name}: must be a number, got {show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidRequestError(f"{name}: the int given is too large for a float") from None
    if finite and not math.isfinite(number):
        raise InvalidRequestError(f"{name}: must be a finite number, got {number}")
    if number < low or (low_open and number == low) or (high is not None and number > high):
        top = high if high is not None else "inf"
        raise InvalidRequestError(f"{name}: {show(value)} is outside {'(' if low_open else '['}{low}, {top}]")
    return number


def _token_key(key: Any) -> Any:
    """A logit_bias key: JSON objects (the OpenAI API) carry token ids as strings of ASCII digits."""
    if isinstance(key, str):
        digits = key[1:] if key.startswith("-") else key
        if digits.isascii() and digits.isdigit() and len(digits) <= 12:  # int() of a huge string is slow
            return int(key)
        raise InvalidRequestError(f"logit_bias: key {key[:40]!r} is not a token id")
    return key


def as_int(name: str, value: Any, low: int, high: int | None = MAX_INT) -> int:
    """``value`` as an int (an int or a numpy integer, never a bool or a float), checked against the
    bounds (``high`` defaults to MAX_INT, which every integer field fits; None for no bound)."""
    if _is_bool(value):
        raise InvalidRequestError(f"{name}: must be an int, got {show(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidRequestError(f"{name}: must be an int, got {show(value)}") from None
    if number < low or (high is not None and number > high):
        raise InvalidRequestError(f"{name}: {show(number)} is outside [{low}, {high if high is not None else 'inf'}]")
    return number


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about hostile input (a
    10**5000 int cannot even be turned into a str; a 10 MB string should not be echoed)."""
    try:
        text = repr(value)
    except ValueError:  # an int too large for str()
        return f"an int of about {value.bit_length() * 3 // 10} digits" if isinstance(value, int) else "a value"
    return text if len(text) <= limit else text[: limit - 3] + "..."
