"""choral: many LLM conversations and requests through one model at once."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from choral.config import EngineConfig
    from choral.conversation import (
        BatchedExecutor,
        CancelToken,
        ChatSession,
        ContextShift,
        Conversation,
        DecodeResult,
        State,
    )
    from choral.engine.soft_prompt import SoftPrompt
    from choral.errors import (
        ChoralError,
        ConfigError,
        ConversationClosedError,
        ConversationStateError,
        CorruptStateError,
        ExecutorClosedError,
        IncompatibleStateError,
        InvalidRequestError,
        KvCacheExhaustedError,
        LoraError,
        LoraLoadError,
        ModelLoadError,
        ModelNotFoundError,
        PromptTooLongError,
        RequiresInferenceError,
        RequiresPromptError,
        StateLoadError,
        TokenIdOutOfRangeError,
        UnknownLoraError,
        UnsupportedArchitectureError,
        UnsupportedStateVersionError,
        UnsupportedTensorTypeError,
    )
    from choral.finish import FinishReason
    from choral.llm import LLM
    from choral.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from choral.sampling.guided import GuidedDecodingParams, StructuredOutputsParams
    from choral.sampling.params import SamplingParams

# Public name -> the module that defines it. ``import choral`` imports none of them (torch alone
# takes seconds to import); each is imported on first access.
_LAZY = {
    "LLM": "choral.llm",
    "SamplingParams": "choral.sampling.params",
    "FinishReason": "choral.finish",
    "EngineConfig": "choral.config",
    "CompletionOutput": "choral.outputs",
    "RequestOutput": "choral.outputs",
    "RequestMetrics": "choral.outputs",
    "Logprob": "choral.outputs",
    "GuidedDecodingParams": "choral.sampling.guided",
    "StructuredOutputsParams": "choral.sampling.guided",
    "SoftPrompt": "choral.engine.soft_prompt",
    **dict.fromkeys(("BatchedExecutor", "CancelToken", "ChatSession", "ContextShift", "Conversation",
                     "DecodeResult", "State"), "choral.conversation"),
    **dict.fromkeys((
        "ChoralError", "ConfigError", "ConversationClosedError", "ConversationStateError", "CorruptStateError",
        "ExecutorClosedError", "IncompatibleStateError", "InvalidRequestError", "KvCacheExhaustedError",
        "ModelLoadError", "ModelNotFoundError", "PromptTooLongError", "RequiresInferenceError",
        "RequiresPromptError", "StateLoadError", "TokenIdOutOfRangeError", "UnsupportedArchitectureError",
        "UnsupportedStateVersionError", "UnsupportedTensorTypeError", "LoraError", "LoraLoadError",
        "UnknownLoraError"), "choral.errors"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'choral' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "LLM",
    "BatchedExecutor",
    "CancelToken",
    "ChatSession",
    "ChoralError",
    "CompletionOutput",
    "ConfigError",
    "ContextShift",
    "Conversation",
    "ConversationClosedError",
    "ConversationStateError",
    "CorruptStateError",
    "DecodeResult",
    "EngineConfig",
    "GuidedDecodingParams",
    "Logprob",
    "RequestMetrics",
    "StructuredOutputsParams",
    "ExecutorClosedError",
    "FinishReason",
    "IncompatibleStateError",
    "InvalidRequestError",
    "KvCacheExhaustedError",
    "LoraError",
    "LoraLoadError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "RequestOutput",
    "RequiresInferenceError",
    "RequiresPromptError",
    "SamplingParams",
    "SoftPrompt",
    "State",
    "StateLoadError",
    "TokenIdOutOfRangeError",
    "UnknownLoraError",
    "UnsupportedArchitectureError",
    "UnsupportedStateVersionError",
    "UnsupportedTensorTypeError",
]
