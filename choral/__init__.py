"""choral: many LLM conversations and requests through one model at once."""

from choral import models as _models  # noqa: F401  (registers the architectures)
from choral.config import EngineConfig
from choral.engine.outputs import CompletionOutput, RequestOutput
from choral.errors import (
    ChoralError,
    ConfigError,
    InvalidRequestError,
    KvCacheExhaustedError,
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenIdOutOfRangeError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from choral.llm import LLM
from choral.sampling.params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ChoralError",
    "CompletionOutput",
    "ConfigError",
    "EngineConfig",
    "InvalidRequestError",
    "KvCacheExhaustedError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
    "TokenIdOutOfRangeError",
    "UnsupportedArchitectureError",
    "UnsupportedTensorTypeError",
]
