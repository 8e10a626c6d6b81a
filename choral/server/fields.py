"""Request fields we do not model: ignored with a warning (the default), or refused (``--strict``).

Clients written for OpenAI or agent frameworks send fields this server has no use for (``store``,
``metadata``, ``service_tier``, ``reasoning_effort``, llama.cpp's ``cache_prompt``, ...). vLLM
chose to ignore unknown fields with a warning because refusing them broke clients; so do we: each
one is logged once per request and listed in the ``X-Choral-Ignored-Fields`` response header.
``--strict`` refuses them with a 400 instead. Fields that would change what the answer means and
that we cannot honour (audio output, legacy ``functions``, ``suffix``, ...) are a 400 either way.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from choral.server.errors import ApiError

logger = logging.getLogger("choral.server")

IGNORED_HEADER = "X-Choral-Ignored-Fields"

# field -> why it is refused even when unknown fields are ignored.
_REFUSED = {
    "audio": "audio output is not supported: this server generates text",
    "functions": "the legacy functions API is not supported; send tools (and tool_choice) instead",
    "function_call": "the legacy functions API is not supported; send tool_choice (with tools) instead",
    "web_search_options": "web search is not supported by this server",
    "suffix": "suffix (insertion between a prompt and a suffix) is not supported by this server",
    "guided_grammar": "guided_grammar is not supported by this server's HTTP API; use response_format",
    "prompt_embeds": "prompt embeddings are not accepted over HTTP; use the Python API "
                     "(LLM.generate with a {'prompt_embeds': tensor} prompt, docs/lora.md)",
}


def check_fields(body: BaseModel, strict: bool, endpoint: str) -> list[str]:
    """The unknown fields of ``body`` (nested models' too, dotted) that are ignored. Raises a 400
    for a field that cannot be ignored, or for any unknown field when ``strict``."""
    unknown = list(_extras(body, ""))
    for name, value in unknown:
        reason = _refusal(name, value)
        if reason is not None:
            raise ApiError(400, f"{name}: {reason}", param=name)
    if strict and unknown:
        name = unknown[0][0]
        raise ApiError(400, f"unknown field {name!r} (the server runs with --strict)", param=name)
    for name, _ in unknown:
        logger.warning("%s: ignoring the unknown field %r", endpoint, name)
    return [name for name, _ in unknown]


def _extras(model: BaseModel, prefix: str) -> list[tuple[str, Any]]:
    if getattr(type(model), "keeps_extra", False):  # a chat message's keys go to the template
        return []
    found = [(prefix + key, value) for key, value in (model.model_extra or {}).items()]
    for key in type(model).model_fields:
        value = getattr(model, key)
        if isinstance(value, BaseModel):
            found += _extras(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += _extras(item, f"{prefix}{key}[{i}].")
    return found


def _refusal(name: str, value: Any) -> str | None:
    if name in _REFUSED:
        return _REFUSED[name]
    if name == "modalities" and value not in (None, ["text"]):
        return f"only the text modality is supported, got {value!r}"
    if name == "best_of" and value not in (None, 1):
        return "best_of is not supported; use n"
    return None
