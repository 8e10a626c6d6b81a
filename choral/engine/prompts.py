"""Turn user prompts (text, token ids, chat messages, vLLM prompt dicts) into validated token ids."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from choral.errors import InvalidRequestError, PromptTooLongError, TokenIdOutOfRangeError
from choral.tokenizer import Tokenizer

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


# vLLM's prompt dicts: TextPrompt {"prompt": str} and TokensPrompt {"prompt_token_ids": [...]}.
PROMPT_KEYS = ("prompt", "prompt_token_ids")
# Keys vLLM's prompt dicts may carry that change what is generated, and that choral cannot honour.
_REFUSED_KEYS = {
    "multi_modal_data": "multi-modal inputs are not supported (text-only models)",
    "mm_processor_kwargs": "multi-modal inputs are not supported (text-only models)",
    "multi_modal_uuids": "multi-modal inputs are not supported (text-only models)",
    "prompt_embeds": "prompt embeddings go to LLM.generate (a {'prompt_embeds': tensor} prompt) or "
                     "Request(soft_prompt=SoftPrompt(tensor)); not inside a request's prompt",
    "negative_prompt": "negative prompts are not supported",
}


def is_prompt_dict(value: Any) -> bool:
    """A vLLM prompt dict (has ``prompt`` or ``prompt_token_ids`` and no chat ``role``)."""
    return isinstance(value, dict) and "role" not in value and any(k in value for k in (*PROMPT_KEYS,
                                                                                        *_REFUSED_KEYS))


def is_single_prompt(prompts: Any) -> bool:
    """A str, a list of ints, a list of chat-message dicts, or one vLLM prompt dict is one prompt;
    anything else is a list of prompts."""
    if isinstance(prompts, str) or isinstance(prompts, dict):
        return True
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, dict) for p in prompts):
        return not any(is_prompt_dict(p) for p in prompts)  # chat messages, not a batch of prompt dicts
    if isinstance(prompts, Sequence) and prompts and all(_is_token(p) for p in prompts):
        return True
    return False


def is_token_list(prompt: Any) -> bool:
    """A list of token ids, or a prompt dict that gives them."""
    if isinstance(prompt, dict):
        return "prompt_token_ids" in prompt
    return isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(_is_token(t) for t in prompt)


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
    if isinstance(prompt, dict):
        return _from_prompt_dict(prompt, tokenizer)
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


def _from_prompt_dict(prompt: dict[str, Any], tokenizer: Tokenizer | None) -> tuple[str | None, list[int]]:
    for key, why in _REFUSED_KEYS.items():
        if prompt.get(key) is not None:
            raise InvalidRequestError(f"prompt: {key}: {why}")
    if "role" in prompt:
        raise InvalidRequestError("prompt: a single chat message; pass a list of messages (a conversation)")
    unknown = sorted(str(k) for k in prompt if k not in (*PROMPT_KEYS, *_REFUSED_KEYS, "cache_salt"))
    if unknown:
        raise InvalidRequestError(f"prompt: unknown key(s) {', '.join(unknown)} in a prompt dict; "
                                  "known: prompt (text), prompt_token_ids (token ids)")
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if isinstance(ids, str | bytes | dict) or not isinstance(ids, Sequence) or not all(_is_token(t) for t in ids):
            raise InvalidRequestError("prompt_token_ids: must be a list of token ids (ints)")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise InvalidRequestError(f"prompt: must be a str, got {type(text).__name__}")
        return text, [operator.index(t) for t in ids]  # vLLM keeps the text alongside, ids win
    text = prompt.get("prompt")
    if not isinstance(text, str):
        raise InvalidRequestError(f"prompt: the prompt dict's 'prompt' must be a str, got {type(text).__name__}; "
                                  "token ids go in 'prompt_token_ids'")
    return to_token_ids(text, tokenizer)


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
