"""choral: many LLM conversations and requests through one model at once."""

from choral import models as _models  # noqa: F401  (registers the architectures)
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
from choral.engine.outputs import CompletionOutput, RequestOutput
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
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    RequiresInferenceError,
    RequiresPromptError,
    StateLoadError,
    TokenIdOutOfRangeError,
    UnsupportedArchitectureError,
    UnsupportedStateVersionError,
    UnsupportedTensorTypeError,
)
from choral.finish import FinishReason
from choral.llm import LLM
from choral.sampling.params import SamplingParams

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
    "ExecutorClosedError",
    "FinishReason",
    "IncompatibleStateError",
    "InvalidRequestError",
    "KvCacheExhaustedError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "RequestOutput",
    "RequiresInferenceError",
    "RequiresPromptError",
    "SamplingParams",
    "State",
    "StateLoadError",
    "TokenIdOutOfRangeError",
    "UnsupportedArchitectureError",
    "UnsupportedStateVersionError",
    "UnsupportedTensorTypeError",
]
