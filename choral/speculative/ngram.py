"""Prompt lookup (n-gram) proposals: continue the latest earlier occurrence of the last n tokens.

When a sequence's last ``n`` tokens (``ngram_max`` down to ``ngram_min``) appeared before in its
prompt or output, the tokens that followed that occurrence are proposed. Editing, summarising
with quotes, code refactoring and retrieval answers repeat their prompt a lot, so whole runs of
tokens are accepted in one forward.

The index maps every ``ngram_min``-gram to the positions where it ends; it is extended as the
sequence grows (a few dict operations per new token), so a proposal costs a dict lookup plus a
short backward comparison per candidate instead of a scan of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_CANDIDATES = 32  # most recent occurrences compared per proposal: bounds the cost on long repeats


class NgramProposer:
    """One sequence's prompt-lookup proposer."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._ends: dict[tuple[int, ...], list[int]] = {}  # ngram_min-gram -> positions where it ends
        self._indexed = 0  # positions < this are in ``_ends``

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the best earlier match of the sequence's tail."""
        length = len(token_ids)
        n = self.ngram_min
        if k <= 0 or length <= n:
            return []
        # Index every n-gram that ends before the last position (an n-gram ending at the last
        # position is the query itself, with nothing after it to propose).
        for end in range(max(self._indexed, n - 1), length - 1):
            self._ends.setdefault(tuple(token_ids[end - n + 1 : end + 1]), []).append(end)
        self._indexed = max(self._indexed, length - 1)
        ends = self._ends.get(tuple(token_ids[length - n :]))
        if not ends:
            return []
        best_end, best_len = -1, 0
        for end in reversed(ends[-MAX_CANDIDATES:]):  # latest first: ties go to the latest match
            matched = n
            while (matched < self.ngram_max and end - matched >= 0
                   and token_ids[end - matched] == token_ids[length - 1 - matched]):
                matched += 1
            if matched > best_len:
                best_end, best_len = end, matched
                if matched == self.ngram_max:
                    break
        return list(token_ids[best_end + 1 : best_end + 1 + k])
