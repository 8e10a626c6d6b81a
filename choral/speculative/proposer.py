"""The proposer interface: given a sequence's tokens, guess its next few tokens.

A proposer belongs to one sequence (it may index that sequence's tokens incrementally: the
executor's sequences only ever grow). Its guesses are checked by the target model in the next
step (choral/executor/step_runner.py), so a bad guess costs compute, never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Proposer(Protocol):
    """Proposes up to ``k`` tokens to follow ``token_ids`` (prompt + output so far).

    A proposer with ``batched = True`` (a draft model's, choral/engine/draft_model.py) is asked
    through its :class:`DraftSource` for all its sequences at once, and has a ``close()`` that
    gives its resources back when the sequence ends."""

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]: ...


class DraftSource(Protocol):
    """A draft model as the speculator sees it (the engine core's DraftModel meets it)."""

    @property
    def name(self) -> str: ...

    def proposer(self, p_min: float) -> Any: ...

    def propose(self, items: list[tuple[Any, Sequence[int], int]]) -> list[list[int]]: ...
