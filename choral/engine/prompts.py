"""Turn user prompts (text, token ids, chat messages) into validated token ids."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from choral.errors import InvalidRequestError, PromptTooLongError, TokenIdOutOfRangeError
from choral.tokenizer import Tokenizer

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


def is_single_prompt(prompts: Any) -> bool:
    """A str, a list of ints, or a list of chat-message dicts is one prompt; else a list of them."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, dict) for p in prompts):
        return True
    if isinstance(prompts, Sequence) and prompts and all(_is_token(p) for p in prompts):
        return True
    return False


def _is_token(value: Any) -> bool:
    """An int or a numpy integer (numpy's bool has no ``__index__``), never a bool."""
    if type(value) is int:  # the common case, without the exception machinery below
        return True
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def to_token_ids(prompt: Any, tokenizer: Tokenizer | None) -> tuple[str | None, list[int]]:
    """(the text if the prompt was text, its token ids)."""
    if isinstance(prompt, bytes | bytearray | memoryview):
        # bytes are a Sequence of ints, but hardly ever meant as token ids.
        raise InvalidRequestError(f"prompt: {type(prompt).__name__} is not accepted; decode it to a str for "
                                  "text, or pass a list of token ids")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass token ids instead of text")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, dict) for p in prompt):
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: chat messages need one")
        return None, tokenizer.apply_chat_template(prompt)
    if isinstance(prompt, Sequence) and all(_is_token(t) for t in prompt):
        return None, [operator.index(t) for t in prompt]
    raise InvalidRequestError(
        f"prompt must be a str, a list of token ids or a list of chat messages, got {type(prompt).__name__}"
    )


def validate_token_ids(token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    if not token_ids:
        raise InvalidRequestError("prompt is empty")
    for t in token_ids:
        if t < 0 or t >= vocab_size:
            raise TokenIdOutOfRangeError(f"token id {t} is out of range [0, {vocab_size})")
    if len(token_ids) >= max_model_len:
        raise PromptTooLongError(
            f"prompt has {len(token_ids)} tokens; the context holds {max_model_len}, "
            f"so a prompt may have at most {max_model_len - 1}"
        )
