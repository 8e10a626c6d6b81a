"""Engine configuration: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from choral.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS = ("auto", "native", "dequantize")
QUANTIZATIONS = ("q8_0", "q4_0")
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads the model and sizes its KV cache.

    Attributes:
        model: a model name (``smollm2-135m-instruct``), a ``.gguf`` file or an HF model directory.
        dtype: ``auto`` picks bf16 where the device computes it fast, else fp32 (always fp32
            with native quantized weights).
        weights: how quantized weights are held. ``native``: kept packed as stored (GGUF Q8_0,
            Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) and multiplied by the CPU's integer-dot
            kernels, with fp32 activations; CPU only. ``dequantize``: every weight converted to
            ``dtype`` at load (the CUDA path). ``auto`` (default): ``native`` for a model with
            quantized tensors on the CPU (unless ``dtype`` asks for bf16/fp16), else ``dequantize``.
        quantization: ``q8_0`` or ``q4_0`` quantizes a float model's projection and embedding
            weights at load (llama.cpp's formats) and runs them natively; None keeps them as stored.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        block_size: tokens per KV block.
        kv_cache_tokens: KV capacity in tokens (rounded up to whole blocks).
        kv_cache_memory_bytes: KV capacity as a memory budget; used when ``kv_cache_tokens`` is None.
            When both are None the pool holds ``max_model_len`` tokens times ``max_num_seqs``,
            capped at a quarter of free host memory.
        max_model_len: the context limit; None means the model's own.
        max_num_batched_tokens: tokens one forward may carry (prefill chunks + decodes).
        max_num_seqs: sequences one forward may carry.
        num_threads: CPU threads for torch; None leaves torch's default.
        seed: seed of the engine's default random generator.
        attention_backend: ``auto`` (the C kernel on CPU when it compiles, else torch),
            ``kernel`` or ``torch``.
        enable_lora: serve LoRA adapters (docs/lora.md): allocates ``max_loras`` device slots.
        max_loras: adapters one step may use (device slots; others wait, least recently used
            slots are refilled).
        max_lora_rank: the largest adapter rank accepted (slots are sized for it).
        draft_model: a draft model for speculative decoding (docs/speculative.md): any model
            choral loads that shares the target's tokenizer (a smaller one, or a quantized copy
            of the target). Loaded next to the target with its own KV cache of the same size;
            requests use it with ``speculative={"method": "draft"}``. None: no draft model.
        draft_weights: ``weights`` for the draft model (``auto``: native for a quantized GGUF).
        tensor_parallel_size: ranks (processes) one forward is split over (docs/scale-out.md):
            each holds a share of the attention heads and MLP columns and its own K/V for them,
            on the CPU (gloo) or one GPU each (``cuda``: NCCL, ranks on cuda:0 .. N-1). 1: one
            process, today's path. Above 1 weights are dequantized (not ``native``, no
            ``quantization``); LoRA and a draft model are not available.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    num_threads: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    weights: str = "auto"
    quantization: str | None = None
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    draft_model: str | None = None
    draft_weights: str = "auto"
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model: must be a non-empty string (a model name or path)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} is not 'cpu', 'cuda' or 'cuda:N'")
        _positive("block_size", self.block_size)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        for name in ("kv_cache_tokens", "kv_cache_memory_bytes", "max_model_len", "num_threads"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        if self.attention_backend not in ("auto", "kernel", "torch"):
            raise ConfigError(
                f"attention_backend: {self.attention_backend!r} is not one of auto, kernel, torch"
            )
        if self.weights not in WEIGHTS:
            raise ConfigError(f"weights: {self.weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.quantization is not None:
            if self.quantization not in QUANTIZATIONS:
                raise ConfigError(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)} "
                                  "(or None)")
            if self.weights == "dequantize":
                raise ConfigError("quantization: weights='dequantize' would undo it; use weights='native' or 'auto'")
        if self.weights == "native" or self.quantization is not None:
            if self.device != "cpu":
                raise ConfigError("weights: native quantized weights run on the CPU; on CUDA quantized "
                                  "models are dequantized at load (weights='dequantize')")
            if self.dtype not in ("auto", "float32"):
                raise ConfigError(f"dtype: native quantized weights compute in float32, not {self.dtype}; "
                                  "pass dtype='float32' or 'auto', or weights='dequantize'")
        if not isinstance(self.enable_lora, bool):
            raise ConfigError(f"enable_lora: must be a bool, got {self.enable_lora!r}")
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        if self.max_lora_rank > 512:
            raise ConfigError(f"max_lora_rank: {self.max_lora_rank} is above 512")
        if self.draft_model is not None and (not isinstance(self.draft_model, str) or not self.draft_model):
            raise ConfigError("draft_model: must be a non-empty string (a model name or path) or None")
        if self.draft_weights not in WEIGHTS:
            raise ConfigError(f"draft_weights: {self.draft_weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.draft_weights == "native" and (self.device != "cpu" or self.dtype not in ("auto", "float32")):
            raise ConfigError("draft_weights: native quantized weights run on the CPU in float32")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size > 1:
            self._check_tensor_parallel()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed: must be an int, got {self.seed!r}")

    def _check_tensor_parallel(self) -> None:
        n = self.tensor_parallel_size
        if self.weights == "native" or self.quantization is not None:
            raise ConfigError(f"tensor_parallel_size={n}: quantized weights kept packed cannot be split over "
                              "ranks yet; use weights='dequantize' (or 'auto') and no quantization")
        if self.enable_lora:
            raise ConfigError(f"tensor_parallel_size={n}: LoRA adapters are not supported under tensor "
                              "parallelism; use tensor_parallel_size=1 to serve adapters")
        if self.draft_model is not None:
            raise ConfigError(f"tensor_parallel_size={n}: a draft model is not supported under tensor "
                              "parallelism (n-gram speculation is); use tensor_parallel_size=1 for draft_model")
        if self.device.startswith("cuda:") and self.device != "cuda:0":
            raise ConfigError(f"tensor_parallel_size={n}: ranks run on cuda:0 .. cuda:{n - 1}; pass device='cuda'")

    @property
    def load_weights(self) -> str:
        """How the weights are loaded: ``weights``, except that tensor parallelism always
        dequantizes (``auto`` would keep a quantized GGUF packed on the CPU)."""
        return "dequantize" if self.tensor_parallel_size > 1 else self.weights

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build a config, rejecting unknown option names instead of dropping them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(
                f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: must be a positive int, got {value!r}")
