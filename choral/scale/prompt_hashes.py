"""A request's prompt as the replicas' prefix cache sees it: the chained hashes of its full blocks.

The router must find the replica caching a prompt's leading blocks, so it hashes exactly as a
replica's ``KvCache`` does: the same tokenizer and chat template (loaded from the same model
files, ``choral.loader.load.load_tokenizer``), the same request rendering (``render_chat`` with the
same tool-call format; ``Tokenizer.encode`` for completions), the same block size, and the same
chain, ``BlockPool.chain_hash``: block i's hash is ``hash((hash of block i-1, its tokens))``,
starting from ``ROOT_HASH`` (base-model requests carry no cache salt). Only full blocks count.

The hashes are a hint: a request this cannot read (bad JSON, an unknown route, a LoRA adapter's
model name, a prompt past the limits) gets none and goes to the least loaded replica, whose app
then answers it exactly as the single-process server would, errors included.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import ValidationError

from choral.errors import ChoralError
from choral.kv.block_pool import BlockPool
from choral.server.chat_render import render_chat
from choral.server.errors import ApiError
from choral.server.limits import ServerLimits
from choral.server.protocol import ChatCompletionRequest, CompletionRequest
from choral.server.tool_choice import plan_tools
from choral.server.tool_parsers import detect_format, format_named
from choral.tokenizer import Tokenizer

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def block_hashes(token_ids: Sequence[int], block_size: int, salt: int | None = None) -> tuple[int, ...]:
    """The chained hashes of every full block of ``token_ids`` (KvCache.register_full_blocks' chain)."""
    out: list[int] = []
    parent = salt
    for i in range(len(token_ids) // block_size):
        parent = BlockPool.chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return tuple(out)


class PromptHasher:
    """Request bodies -> their prompt's block hashes, as the replicas serving ``model_name`` hash."""

    def __init__(self, tokenizer: Tokenizer | None, block_size: int, model_name: str,
                 limits: ServerLimits, max_model_len: int, tool_call_parser: str | None = None):
        self.tokenizer, self.block_size, self.model_name = tokenizer, block_size, model_name
        self.limits = limits
        self.prompt_chars = limits.prompt_chars(max_model_len)
        self.template_chars = limits.template_chars(max_model_len)
        template = tokenizer.chat_template if tokenizer is not None else None
        self.tool_format = format_named(tool_call_parser) if tool_call_parser else detect_format(template, model_name)

    def hashes(self, path: str, body: bytes) -> tuple[int, ...]:
        """The hashes of the prompt of a POST to ``path`` with ``body``; () when there is none to read."""
        if path not in (COMPLETIONS, CHAT):
            return ()
        try:
            ids = self.prompt_ids(path, json.loads(body))
        except (ValueError, ValidationError, ApiError, ChoralError, TypeError):
            return ()  # the replica answers what is wrong with it; a hint is not needed for that
        return block_hashes(ids, self.block_size) if ids else ()

    def prompt_ids(self, path: str, data: object) -> list[int] | None:
        """The token ids the replica will compute first for this request (its first prompt's),
        or None when the request names another model (a LoRA adapter: salted chains)."""
        if not isinstance(data, dict) or data.get("model") not in (None, self.model_name):
            return None
        if path == COMPLETIONS:
            return self._completion_ids(CompletionRequest.model_validate(data))
        body = ChatCompletionRequest.model_validate(data)
        if self.tokenizer is None or sum(_chars(m.content) for m in body.messages) > self.prompt_chars:
            return None
        rendered = render_chat(self.tokenizer, body, plan_tools(body, self.tool_format),
                               timeout_s=self.limits.template_timeout_s, max_chars=self.template_chars)
        return rendered.token_ids

    def _completion_ids(self, body: CompletionRequest) -> list[int] | None:
        prompt = body.prompt
        first = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else prompt
        if isinstance(first, list) and all(isinstance(t, int) for t in first):
            return [int(t) for t in first]  # type: ignore[arg-type]  # ints, checked above
        if isinstance(first, str) and self.tokenizer is not None and len(first) <= self.prompt_chars:
            return self.tokenizer.encode(first)
        return None


def _chars(content: object) -> int:
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return len(content) if isinstance(content, str) else 0
