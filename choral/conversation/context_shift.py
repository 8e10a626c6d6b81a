"""ContextShift: the policy of the automatic context shift (what to drop when a prompt would
pass the context limit). The shift itself is ``Conversation.shift_left``."""

from __future__ import annotations

from dataclasses import dataclass

from choral.errors import InvalidRequestError, PromptTooLongError


@dataclass(frozen=True)
class ContextShift:
    """When a prompt would pass the context limit, drop ``discard`` tokens after the first
    ``keep`` (default: half of the tokens after ``keep``, or more if the prompt needs it)."""

    keep: int = 0
    discard: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise InvalidRequestError(f"context_shift.keep: must be an int >= 0, got {self.keep!r}")
        if self.discard is not None and (isinstance(self.discard, bool) or not isinstance(self.discard, int)
                                         or self.discard < 1):
            raise InvalidRequestError(f"context_shift.discard: must be an int >= 1, got {self.discard!r}")


def plan_shift(shift: ContextShift | None, num_tokens: int, num_new: int, limit: int) -> int:
    """Tokens to drop after ``shift.keep`` so ``num_new`` more fit in ``limit`` (0: they fit).
    Raises PromptTooLongError when no shift is allowed or none is enough."""
    overflow = num_tokens + num_new - limit
    if overflow <= 0:
        return 0
    rest = num_tokens - (shift.keep if shift else 0)
    if shift is None or overflow > rest:
        hint = "" if shift else "; enable context_shift or shift_left() first"
        raise PromptTooLongError(
            f"the conversation holds {num_tokens} tokens; {num_new} more pass the context limit {limit}{hint}"
        )
    return min(rest, max(overflow, shift.discard or rest // 2))
