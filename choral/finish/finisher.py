"""Finisher: the one place that decides when a sequence ends and what text it produced.

Every driver feeds it the tokens it samples, one at a time: the executor (per sequence),
``LLM.generate`` (through the executor) and ``ChatSession`` (per answer). It owns the output's
incremental detokenizer and checks, in this order, after each token:

1. nothing ends a sequence before ``min_tokens`` tokens except the length limits (vLLM's rule;
   the sampler also masks the end ids until then);
2. an end id (EOS unless ``ignore_eos``, the request's ``end_id``): ``END_ID``;
3. a stop token id, a stop token sequence, or a stop string ending in the text of the
   ``min_tokens``-th token or later: ``STOP_WORDS`` (the text is cut before the stop string);
4. ``max_tokens`` output tokens, or ``max_model_len`` tokens in all (prompt + output): ``LENGTH``.

``stop_reason`` says which id or string ended it (vLLM's field).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from choral.finish.detokenizer import IncrementalDetokenizer
from choral.finish.reason import FinishReason

if TYPE_CHECKING:
    from choral.sampling.params import SamplingParams
    from choral.tokenizer import Tokenizer


@dataclass(frozen=True)
class StopConditions:
    """When a sequence ends; built once per request, shared by its sequences.

    Attributes:
        end_ids: tokens that end it as ``END_ID`` (EOS unless ignore_eos, the request's end_id).
        stop_token_ids: tokens that end it as ``STOP_WORDS``.
        stop_sequences: token sequences that end it as ``STOP_WORDS`` once the output ends with one.
        stop: strings that end it as ``STOP_WORDS``; the text is cut before the first match.
        min_tokens: output tokens before anything but the length limits may end it.
        max_tokens: output tokens at which it ends as ``LENGTH`` (None: no limit).
        max_model_len: prompt + output tokens at which it ends as ``LENGTH`` (None: no limit).
        skip_special_tokens: leave special tokens out of the text.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
    """

    end_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    max_tokens: int | None = None
    max_model_len: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: Iterable[int], *, max_tokens: int | None = None,
                    max_model_len: int | None = None, end_id: int | None = None,
                    stop_sequences: Sequence[tuple[int, ...]] = ()) -> StopConditions:
        """The conditions of ``params`` (``max_tokens`` overrides ``params.max_tokens``)."""
        ends = set() if params.ignore_eos else set(eos_token_ids)
        if end_id is not None:
            ends.add(end_id)
        return cls(end_ids=frozenset(ends), stop_token_ids=frozenset(params.stop_token_ids),
                   stop_sequences=tuple(stop_sequences), stop=tuple(params.stop), min_tokens=params.min_tokens,
                   max_tokens=params.max_tokens if max_tokens is None else max_tokens,
                   max_model_len=max_model_len, skip_special_tokens=params.skip_special_tokens,
                   include_stop_str_in_output=params.include_stop_str_in_output)

    def token_reason(self, token: int) -> FinishReason | None:
        """``END_ID`` or ``STOP_WORDS`` if ``token`` by itself ends a sequence, else None."""
        if token in self.end_ids:
            return FinishReason.END_ID
        if token in self.stop_token_ids:
            return FinishReason.STOP_WORDS
        return None


class Finisher:
    """The output of one sequence: its tokens, its text, and whether and why it ended.

    Args:
        conditions: when it ends.
        tokenizer: decodes the text (None: no text, the token conditions still apply).
        num_prompt_tokens: tokens before the output, counted against ``max_model_len``.
        decode_end_tokens: False leaves a token that ends the sequence by id (EOS, a stop id) out
            of the text (ChatSession's answers); the executor keeps it (dropped by
            ``skip_special_tokens`` when it is special).
    """

    def __init__(self, conditions: StopConditions, tokenizer: Tokenizer | None, num_prompt_tokens: int = 0,
                 decode_end_tokens: bool = True):
        self.conditions = conditions
        self.num_prompt_tokens = num_prompt_tokens
        self.decode_end_tokens = decode_end_tokens
        self.token_ids: list[int] = []
        self.reason = FinishReason.NOT_FINISHED
        self.stop_reason: int | str | None = None  # the end id, stop id or stop string that ended it
        self._detok = IncrementalDetokenizer(tokenizer, conditions.stop, conditions.skip_special_tokens,
                                             min_tokens=conditions.min_tokens,
                                             include_stop=conditions.include_stop_str_in_output)

    @property
    def finished(self) -> bool:
        return self.reason is not FinishReason.NOT_FINISHED

    @property
    def num_tokens(self) -> int:
        """Output tokens so far."""
        return len(self.token_ids)

    @property
    def text(self) -> str:
        """The text so far (cut before a stop string; an unfinished character waits for ``flush``)."""
        return self._detok.text

    def add(self, token: int) -> FinishReason:
        """Take one output token; returns ``reason`` (``NOT_FINISHED`` while it goes on).

        Tokens added after the end (a beam hypothesis replayed whole) are kept in ``token_ids``
        and the reason stays the first one; the text stops growing at a stop string."""
        c = self.conditions
        self.token_ids.append(token)
        n = len(self.token_ids)
        by_token = c.token_reason(token) if n >= c.min_tokens and not self.finished else None
        if by_token is None or self.decode_end_tokens:
            self._detok.add(token)
        if self.finished:
            return self.reason
        if by_token is not None:
            return self._end(by_token, token)
        if n >= c.min_tokens:
            if any(len(w) <= n and tuple(self.token_ids[-len(w):]) == w for w in c.stop_sequences):
                return self._end(FinishReason.STOP_WORDS, None)
            if self._detok.stopped_on is not None:
                return self._end(FinishReason.STOP_WORDS, self._detok.stopped_on)
        if (c.max_tokens is not None and n >= c.max_tokens) or \
                (c.max_model_len is not None and self.num_prompt_tokens + n >= c.max_model_len):
            return self._end(FinishReason.LENGTH, None)
        return self.reason

    def _end(self, reason: FinishReason, stop_reason: int | str | None) -> FinishReason:
        self.reason = reason
        self.stop_reason = stop_reason
        return reason

    def delta(self) -> str:
        """Text not handed out yet, holding back a tail that may still begin a stop string."""
        return self._detok.delta(final=False)

    def flush(self) -> str:
        """At the end: everything not handed out yet (an unfinished character stays U+FFFD)."""
        return self._detok.flush()
