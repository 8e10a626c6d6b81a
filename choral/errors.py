"""choral's exception hierarchy.

Every error a user can cause is one of these, with a message that names the problem.
`assert` is kept for internal invariants only.
"""

from __future__ import annotations


class ChoralError(Exception):
    """Base class of every error choral raises on purpose."""


class ConfigError(ChoralError, ValueError):
    """A configuration value is out of range or unknown; the message names the field."""


class ModelLoadError(ChoralError):
    """A model could not be loaded (missing file, malformed file, bad weights)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model name or path does not resolve to a file or directory."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not in the registry; the message lists what is."""


class UnsupportedTensorTypeError(ModelLoadError):
    """A weight is stored in a tensor type choral cannot dequantize."""


class InvalidRequestError(ChoralError, ValueError):
    """A request (prompt, sampling parameters) is invalid; nothing was changed."""


class TokenIdOutOfRangeError(InvalidRequestError):
    """A prompt holds a token id outside [0, vocab_size)."""


class PromptTooLongError(InvalidRequestError):
    """A prompt (plus what must be generated) does not fit the model's context."""


class KvCacheExhaustedError(ChoralError):
    """The KV block pool has no free block for the requested allocation."""


class QueueFull(ChoralError):
    """The executor's queue holds ``max_queue_size`` requests; retry later."""


class ProcessorStopped(ChoralError):
    """The executor has been shut down and accepts no more requests."""


class UnknownRequestError(ChoralError, KeyError):
    """No request with this id is known to the executor (or its responses were all taken)."""
