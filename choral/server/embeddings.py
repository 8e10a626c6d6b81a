"""``POST /v1/embeddings``: OpenAI's embeddings API over the loaded model (engine/embedder.py).

``input`` is a string, a list of strings, token ids, or a list of token-id lists; each becomes one
normalized vector (``encoding_format`` ``float``, or ``base64`` of its little-endian float32
bytes, what the openai SDK asks for by default). vLLM's extras: ``normalize`` (default true),
``truncate_prompt_tokens`` (keep the last N tokens), ``add_special_tokens``. The pooling (the last
token's hidden state, or the mean) is the server's ``--pooling``.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import Response as HttpResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from choral.engine.embedder import Embedder
from choral.errors import InvalidRequestError
from choral.server.errors import ApiError
from choral.tokenizer import Tokenizer


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # vLLM's extras
    normalize: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    add_special_tokens: bool = True


def install_embeddings(app: FastAPI, embedder: Embedder, tokenizer: Tokenizer | None, model_name: str,
                       pooling: str, check: Callable[[BaseModel, str, HttpResponse], dict[str, str]],
                       check_model: Callable[[str | None], None]) -> None:
    """Add ``/v1/embeddings`` to ``app``. ``check`` handles unknown fields, ``check_model`` the model id."""

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, response: HttpResponse) -> dict[str, Any]:
        check(body, "/v1/embeddings", response)
        check_model(body.model)
        if body.dimensions is not None and body.dimensions != embedder.hidden_size:
            raise ApiError(400, f"dimensions: this model's embeddings have {embedder.hidden_size} dimensions and "
                                "cannot be shortened", param="dimensions")
        inputs = _token_ids(body, tokenizer)
        try:
            vectors = await asyncio.to_thread(embedder.embed, inputs, pooling, body.normalize)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param="input") from None
        data = [{"object": "embedding", "index": i, "embedding": _encode(v.tolist(), body.encoding_format)}
                for i, v in enumerate(vectors)]
        tokens = sum(len(ids) for ids in inputs)
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _token_ids(body: EmbeddingRequest, tokenizer: Tokenizer | None) -> list[list[int]]:
    raw = body.input
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif raw and all(isinstance(t, int) for t in raw):
        items = [raw]
    else:
        items = list(raw)
    if not items:
        raise ApiError(400, "input is empty", param="input")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise ApiError(400, "input: this model has no tokenizer; send token ids", param="input")
            try:
                ids = tokenizer.encode(item, body.add_special_tokens, field=f"input[{i}]")
            except InvalidRequestError as e:
                raise ApiError(400, str(e), param="input") from None
        else:
            ids = list(item)
        if body.truncate_prompt_tokens is not None:
            ids = ids[-body.truncate_prompt_tokens:]
        out.append(ids)
    return out


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
