"""FinishReason: why a sequence ended, one vocabulary for every driver.

The executor, ``LLM.generate``, ``ChatSession`` and the server all speak it; the API strings
(OpenAI's and vLLM's ``finish_reason``) come from ``FinishReason.api_name``, the one mapping.
"""

from __future__ import annotations

import enum


class FinishReason(enum.Enum):
    """Why a sequence ended (``NOT_FINISHED`` while it runs)."""

    NOT_FINISHED = "not_finished"
    END_ID = "end_id"  # the model's EOS (or the request's end_id)
    STOP_WORDS = "stop_words"  # a stop token id, stop token sequence or stop string
    LENGTH = "length"  # max_tokens or the context limit
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"  # allotted_time elapsed
    ERROR = "error"  # ended by an error, which was raised to the caller (ChatSession: KV exhausted...)

    @property
    def api_name(self) -> str | None:
        """OpenAI's / vLLM's ``finish_reason``: "stop", "length", "abort", or None while running."""
        return _API_NAMES[self]


_API_NAMES: dict[FinishReason, str | None] = {
    FinishReason.NOT_FINISHED: None,
    FinishReason.END_ID: "stop",
    FinishReason.STOP_WORDS: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
    FinishReason.TIMED_OUT: "abort",
    FinishReason.ERROR: "abort",
}
