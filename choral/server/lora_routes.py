"""The adapter endpoints (vLLM's names): POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Bodies are ``{"lora_name": ..., "lora_path": ...}`` and ``{"lora_name": ...}``; the answer is a
short text, as vLLM's. A loaded adapter is then a model id of its own (``/v1/models`` lists it
with the base model as its ``parent``), and a request naming it runs with it (docs/lora.md).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from choral.engine.engine_core import EngineCore
from choral.errors import ConfigError, LoraError, UnknownLoraError
from choral.server.errors import ApiError


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None  # vLLM's clients may send it; names identify adapters here


def install_lora_routes(app: FastAPI, core: EngineCore, model_name: str) -> None:
    """Add the load / unload endpoints for ``core``'s adapter registry."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> PlainTextResponse:
        if body.lora_name == model_name:
            raise ApiError(400, f"lora_name: {body.lora_name!r} is the base model's id", param="lora_name")
        try:
            await asyncio.to_thread(core.load_lora, body.lora_name, body.lora_path)  # reads files: off the loop
        except (LoraError, ConfigError) as e:
            raise ApiError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> PlainTextResponse:
        try:
            core.unload_lora(body.lora_name)
        except UnknownLoraError as e:
            raise ApiError(404, str(e), param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
