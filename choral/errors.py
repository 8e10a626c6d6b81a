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


class QuantKernelError(ChoralError):
    """The quantized-weight kernel was given tensors it cannot take, or could not run."""


class InvalidRequestError(ChoralError, ValueError):
    """A request (prompt, sampling parameters) is invalid; nothing was changed."""


class SamplingError(InvalidRequestError):
    """A request's sampling settings left a row of logits without a finite positive probability mass
    (temperature near 0, a huge logit_bias, a tiny repetition_penalty, every token banned): that
    request fails alone; the message names the setting."""


class TokenIdOutOfRangeError(InvalidRequestError):
    """A prompt holds a token id outside [0, vocab_size)."""


class PromptTooLongError(InvalidRequestError):
    """A prompt (plus what must be generated) does not fit the model's context."""


class KernelArgumentError(ChoralError, ValueError):
    """A tensor handed to a C kernel has the wrong dtype, shape, device or memory layout, or an
    index (a block id, a cache slot) outside the cache; the message names the argument. Raised
    before any pointer reaches C, so nothing was read or written."""


class KvCacheExhaustedError(ChoralError):
    """The KV block pool has no free block for the requested allocation."""


class QueueFull(ChoralError):
    """The executor's queue holds ``max_queue_size`` requests; retry later."""


class RequestFailedError(ChoralError):
    """The executor could not finish one request (its logits processor raised, say); the request's
    blocks were freed and every other request goes on. ``__cause__`` is the exception behind it
    when there was one (an InvalidRequestError such as SamplingError: the request's own settings)."""


class ProcessorStopped(ChoralError):
    """The executor has been shut down and accepts no more requests."""


class UnknownRequestError(ChoralError, KeyError):
    """No request with this id is known to the executor (or its responses were all taken)."""


class ExecutorClosedError(ChoralError):
    """The BatchedExecutor was closed; it and its conversations can no longer be used."""


class ConversationStateError(ChoralError):
    """A conversation was used in a state that does not allow the call; nothing was changed."""


class ConversationClosedError(ConversationStateError):
    """The conversation was closed (or its executor was)."""


class RequiresInferenceError(ConversationStateError):
    """The conversation has tokens waiting for ``BatchedExecutor.infer()``."""


class RequiresPromptError(ConversationStateError):
    """The conversation has no logits to sample from: prompt it (then infer) first."""


class StateLoadError(ChoralError):
    """A saved conversation state cannot be loaded; nothing was allocated."""


class IncompatibleStateError(StateLoadError):
    """The saved state was made by a different model (or dtype); the message names the difference."""


class CorruptStateError(StateLoadError):
    """The saved state is truncated, malformed, or fails its checksum."""


class UnsupportedStateVersionError(StateLoadError):
    """The saved state uses a format version newer than this choral understands."""


class ExecutorUsageError(ChoralError):
    """An Executor call that cannot work where it was made: a blocking call from a request
    callback, which runs on the executor's own loop thread and would wait for itself."""


class ExecutorLoopError(ChoralError, RuntimeError):
    """The executor's loop thread died (a bug; its error is the cause): every request it had not
    finished fails with this, and the executor accepts no more."""


class TensorParallelError(ChoralError):
    """A tensor-parallel worker process died, failed to start, or stopped answering within the
    timeout: the engine cannot run another step (requests in flight fail with this as the cause);
    the message names the rank and how it ended. Start a new engine."""


class LoraError(ChoralError):
    """A LoRA adapter could not be used: its files are malformed, or it does not fit the base model
    (a module choral cannot adapt, a shape or rank that does not match); the message names it."""


class LoraLoadError(LoraError, ModelLoadError):
    """A LoRA adapter's files could not be read or do not describe an adapter of this model."""


class UnknownLoraError(LoraError, InvalidRequestError, KeyError):
    """A request (or an unload) names an adapter that is not loaded; the message lists those that are."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
