"""Adaptive proposal length: per sequence, propose less while proposals are rejected.

A rejected proposal costs its tokens' share of the forward and nothing else (the verified
output is the same), so the length follows the sequence's recent acceptance: a fully accepted
proposal doubles it (up to ``k``), a partly accepted one sets it to what was accepted plus one,
a fully rejected one halves it. At zero the sequence stops proposing for a back-off of 2, 4, ...
64 decode steps (doubling while the probes keep failing), then probes again with one token.
"""

from __future__ import annotations

MAX_BACKOFF = 64  # decode steps without proposals after repeated fully rejected probes


class AdaptiveLength:
    """How many tokens one sequence proposes next (``k`` at most)."""

    def __init__(self, k: int, adaptive: bool):
        self.k = k
        self.adaptive = adaptive
        self.length = k
        self._backoff = 0  # decode steps left without proposals
        self._failures = 0  # fully rejected probes in a row

    def limit(self) -> int:
        """Tokens to propose at this decode step (0: none). Counts down the back-off."""
        if self._backoff > 0:
            self._backoff -= 1
            if self._backoff == 0:
                self.length = 1
            return 0
        return self.length

    def record(self, proposed: int, accepted: int) -> None:
        """The verdict on a proposal of ``proposed`` tokens, ``accepted`` of them taken."""
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.length = min(self.k, 2 * proposed)
            self._failures = 0
        elif accepted > 0:
            self.length = min(self.k, accepted + 1)
            self._failures = 0
        else:
            self.length = proposed // 2
            if self.length == 0:
                self._failures += 1
                self._backoff = min(MAX_BACKOFF, 2**self._failures)
