"""Incremental detokenization: text deltas that are right across multi-byte UTF-8 and stop
strings split over tokens.

Decoding token by token breaks characters whose bytes span tokens, and some tokenizers only
render spaces correctly in context. So each step decodes a short window (a few tokens before the
unread ones) and emits only the suffix beyond what that window already produced; an unfinished
character (U+FFFD at the end) waits for the next token. Stop strings are searched in all text so
far; text that could still be the start of a stop string is held back until it is not.

With ``min_tokens``, a stop string counts only once that many tokens exist (vLLM's rule, and the
one the executor applies to stop ids and stop token sequences): a match must end in text decoded
from the ``min_tokens``-th token on; it may begin earlier.
"""

from __future__ import annotations

from collections.abc import Sequence

from choral.tokenizer import Tokenizer

_CONTEXT = 6  # tokens of left context re-decoded each step


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str], skip_special_tokens: bool,
                 min_tokens: int = 0, include_stop: bool = False):
        self.tokenizer = tokenizer
        self.include_stop = include_stop  # keep the matched stop string in the text (vLLM's include_stop_str_in_output)
        self.stop = tuple(stop)
        self.skip = skip_special_tokens
        self.min_tokens = min_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens whose text is already in self.text
        self.text = ""  # all text decoded so far
        self.emitted = 0  # characters of self.text handed out
        self.stopped_on: str | None = None

    def add(self, token_id: int) -> None:
        """Feed one token; updates ``text`` and checks the stop strings."""
        self.tokens.append(token_id)
        if self.tokenizer is None or self.stopped_on is not None:
            return
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset], self.skip)
        full = self.tokenizer.decode(self.tokens[self.prefix_offset :], self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return  # an incomplete character: wait for more bytes
        old_len = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset = max(0, len(self.tokens) - _CONTEXT)
        self.read_offset = len(self.tokens)
        if len(self.tokens) < self.min_tokens:
            return  # too early to stop; a later search still finds a match ending past this text
        # A new match must end in the new text: search from just before it.
        cuts = [c for stop in self.stop
                if (c := self.text.find(stop, max(0, old_len - len(stop) + 1))) >= 0]
        if cuts:
            cut = min(cuts)
            self.stopped_on = next(s for s in self.stop if self.text.startswith(s, cut))
            self.text = self.text[:cut + len(self.stopped_on) if self.include_stop else cut]
            self.emitted = min(self.emitted, len(self.text))

    def delta(self, final: bool) -> str:
        """Text not handed out yet. Until ``final``, keep back a tail that may begin a stop string."""
        hold = 0
        if not final and self.stopped_on is None:
            for stop in self.stop:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        hold = max(hold, k)
                        break
        end = len(self.text) - hold
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def flush(self) -> str:
        """At the end: decode any held-back bytes too (an unfinished character stays U+FFFD)."""
        if self.tokenizer is not None and self.stopped_on is None and self.read_offset < len(self.tokens):
            prefix = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset], self.skip)
            full = self.tokenizer.decode(self.tokens[self.prefix_offset :], self.skip)
            self.text += full[len(prefix) :]
            self.read_offset = len(self.tokens)
        return self.delta(final=True)
