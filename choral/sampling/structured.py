"""Structured output: JSON schema, regex and EBNF/GBNF/Lark grammars through llguidance.

One :class:`GrammarCompiler` per engine turns a request's constraint into a grammar checked
against the tokenizer; each sequence then owns a :class:`GrammarMatcher` (its parser state).
Per step the sampler asks every constrained row for its allowed-token bitmask and applies
all of them in one tensor op; after the draw it advances each matcher by the chosen token.
llguidance was picked over xgrammar because it installs alone (no triton) and runs on any CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from choral.errors import InvalidRequestError
from choral.sampling.params import SamplingParams

_BIT = torch.arange(32, dtype=torch.int32)  # bit positions of one int32 mask word


class GrammarMatcher:
    """A sequence's position in its grammar: which tokens may come next, and advancing it."""

    def __init__(self, matcher: Any):
        self._m = matcher

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the allowed-token bitmask (int32 words, bit i = token 32*w + i) into ``out``,
        a contiguous CPU int32 row of ceil(vocab / 32) words."""
        if out.dtype != torch.int32 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("bitmask row must be a contiguous CPU int32 tensor")
        self._m.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * out.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance by one generated token. False if the grammar rejects it (then it stays in error)."""
        return bool(self._m.consume_token(token_id))

    def fork(self) -> GrammarMatcher:
        """An independent copy at the same position (n > 1 samples of one prompt)."""
        return GrammarMatcher(self._m.deep_copy())

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and only end-of-sequence may follow."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        return str(self._m.get_error()) if self._m.is_error() else None


class GrammarCompiler:
    """Builds matchers for one tokenizer. The llguidance tokenizer is made on first use (~0.4 s)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int):
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: Any = None

    @property
    def words_per_row(self) -> int:
        return -(-self.vocab_size // 32)

    def matcher(self, params: SamplingParams) -> GrammarMatcher:
        """A fresh matcher for the request's constraint; InvalidRequestError names the field."""
        import llguidance
        import llguidance.hf

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
        name, text = _constraint(params)
        try:
            if name == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
            elif name == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(text)
            else:
                grammar = llguidance.grammar_from("grammar", text)  # GBNF/EBNF or Lark
        except Exception as e:  # llguidance raises ValueError/RuntimeError on bad input
            raise InvalidRequestError(f"{name}: {e}") from e
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._ll_tokenizer)
        if problem:
            raise InvalidRequestError(f"{name}: {problem}")
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{name}: {matcher.get_error()}")
        return GrammarMatcher(matcher)


def _constraint(params: SamplingParams) -> tuple[str, str]:
    for name in ("json_schema", "regex", "grammar"):
        value = getattr(params, name)
        if value is not None:
            return name, value
    raise ValueError("request has no structured-output constraint")


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 bitmask -> [R, vocab_size] bool (tokens past the mask are not allowed)."""
    bits = (bitmask.unsqueeze(-1) >> _BIT.to(bitmask.device)) & 1  # [R, W, 32]
    allowed = bits.bool().flatten(1)  # [R, W * 32]
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(allowed.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool, device=allowed.device)
    return torch.cat([allowed, pad], dim=1)
