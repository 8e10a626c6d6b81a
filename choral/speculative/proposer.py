"""The proposer interface: given a sequence's tokens, guess its next few tokens.

A proposer belongs to one sequence (it may index that sequence's tokens incrementally: the
executor's sequences only ever grow). Its guesses are checked by the target model in the next
step (choral/executor/step_runner.py), so a bad guess costs compute, never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Proposer(Protocol):
    """Proposes up to ``k`` tokens to follow ``token_ids`` (prompt + output so far)."""

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]: ...
