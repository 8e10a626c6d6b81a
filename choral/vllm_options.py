"""vLLM's ``LLM(...)`` options: each one honoured, or refused with a message that says why.

vLLM scripts port by changing the import; options choral has no use for (a second GPU, a hub
revision, a quantization method it does not have) fail at construction instead of being dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from choral.config import EngineConfig
from choral.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from choral.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

# vLLM's dtype names -> ours.
_DTYPE_ALIASES = {"auto": "auto", "float32": "float32", "float": "float32", "bfloat16": "bfloat16",
                  "float16": "float16", "half": "float16"}


@dataclass(frozen=True)
class VllmOptions:
    """The vLLM constructor options that are not :class:`EngineConfig` fields, checked once."""

    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"
    revision: str | None = None
    tokenizer_revision: str | None = None
    download_dir: str | None = None
    load_format: str = "auto"
    enable_chunked_prefill: bool | None = None

    def __post_init__(self) -> None:
        for name in ("skip_tokenizer_init", "trust_remote_code", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: must be a positive int, got {value!r}")
        if self.pipeline_parallel_size > 1:
            raise ConfigError(f"pipeline_parallel_size={self.pipeline_parallel_size}: pipeline parallelism is not "
                              "supported (use 1; tensor_parallel_size splits a model over processes)")
        if self.quantization is not None and "quantization" not in _engine_fields():
            raise ConfigError(f"quantization={self.quantization!r}: choral has no quantized weight path to "
                              "choose yet; GGUF weights are dequantized to dtype at load (leave quantization unset)")
        if self.tokenizer_mode not in ("auto", "hf"):
            raise ConfigError(f"tokenizer_mode: {self.tokenizer_mode!r} is not supported; choral loads the "
                              "tokenizer from the model's own files ('auto')")
        if self.kv_cache_dtype != "auto":
            raise ConfigError(f"kv_cache_dtype: {self.kv_cache_dtype!r} is not supported; the KV cache "
                              "takes the model's dtype ('auto')")
        for name in ("revision", "tokenizer_revision", "download_dir"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name}: choral never downloads models; pass a local path or a bundled name")
        if self.load_format not in ("auto", "gguf", "safetensors"):
            raise ConfigError(f"load_format: {self.load_format!r} is not supported (auto, gguf, safetensors)")
        if self.enable_chunked_prefill is False:
            raise ConfigError("enable_chunked_prefill=False: choral always splits long prompts into chunks of "
                              "max_num_batched_tokens; raise max_num_batched_tokens to max_model_len to run "
                              "every prompt in one step")
        util = self.gpu_memory_utilization
        if util is not None and (isinstance(util, bool) or not isinstance(util, int | float) or not 0 < util <= 1):
            raise ConfigError(f"gpu_memory_utilization: must be a number in (0, 1], got {util!r}")
        if self.skip_tokenizer_init and self.tokenizer is not None:
            raise ConfigError("tokenizer: cannot be combined with skip_tokenizer_init=True")


def _engine_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(EngineConfig)}


def engine_config(model: str, dtype: Any, seed: int | None, vllm: VllmOptions, options: dict[str, Any]) -> EngineConfig:
    """The EngineConfig for ``LLM(model, dtype=..., seed=..., **options)``; unknown options are an error
    that lists every option ``LLM`` takes."""
    known = _engine_fields() - {"model", "dtype", "seed"}
    unknown = sorted(set(options) - known)
    if unknown:
        vllm_names = {f.name for f in dataclasses.fields(VllmOptions)} | {"enable_prefix_caching"}
        raise ConfigError(f"unknown LLM option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known | vllm_names | {'model', 'dtype', 'seed'}))}")
    if vllm.gpu_memory_utilization is not None and ({"kv_cache_tokens", "kv_cache_memory_bytes"} & set(options)):
        raise ConfigError("gpu_memory_utilization: give it or kv_cache_tokens / kv_cache_memory_bytes, not both")
    if seed is not None:
        options = {**options, "seed": seed}
    if vllm.tensor_parallel_size != 1:
        options = {**options, "tensor_parallel_size": vllm.tensor_parallel_size}
    if vllm.quantization is not None:  # EngineConfig checks the method (it exists since it has the field)
        options = {**options, "quantization": vllm.quantization}
    config = EngineConfig.from_kwargs(model=model, dtype=_dtype_name(dtype), **options)
    if vllm.load_format != "auto":
        wants_file = vllm.load_format == "gguf"
        from choral.loader.resolve import resolve_model_path

        path = resolve_model_path(model)
        if path.is_file() != wants_file:
            raise ConfigError(f"load_format={vllm.load_format!r} does not match {path} "
                              f"({'a GGUF file' if path.is_file() else 'a directory'})")
    return config


def _dtype_name(dtype: Any) -> str:
    if not isinstance(dtype, str):
        name = str(dtype)  # a torch.dtype: "torch.float16"
        if not name.startswith("torch."):
            raise ConfigError(f"dtype: must be a str or a torch.dtype, got {dtype!r}")
        dtype = name.removeprefix("torch.")
    if dtype not in _DTYPE_ALIASES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[dtype]


def build_engine(config: EngineConfig, vllm: VllmOptions) -> LLMEngine:
    """Load the model, apply the tokenizer options and the GPU memory share, build the engine."""
    from choral.engine.llm_engine import LLMEngine
    from choral.loader.load import load_model

    tp = config.tensor_parallel_size  # rank 0's shard; one process: the call as it always was
    split: dict[str, Any] = {"tp_rank": 0, "tp_size": tp} if tp > 1 else {}
    loaded = load_model(config.model, config.dtype, config.device, config.max_model_len,
                        config.load_weights, config.quantization, **split)
    if vllm.skip_tokenizer_init:
        loaded = dataclasses.replace(loaded, tokenizer=None)
    elif vllm.tokenizer is not None:
        loaded = dataclasses.replace(loaded, tokenizer=_other_tokenizer(vllm.tokenizer, loaded.eos_token_ids,
                                                                        loaded.spec.vocab_size))
    util = vllm.gpu_memory_utilization
    if util is not None:
        if loaded.model.device.type == "cuda":
            config = dataclasses.replace(config, kv_cache_memory_bytes=_kv_budget(loaded.model.device, util))
        else:
            logger.warning("gpu_memory_utilization=%s applies to GPU memory; on the CPU the KV cache is sized by "
                           "kv_cache_tokens / kv_cache_memory_bytes", util)
    return LLMEngine(config, loaded)


def _other_tokenizer(name: str, eos_token_ids: tuple[int, ...], vocab_size: int) -> Any:
    from choral.loader.resolve import resolve_model_path
    from choral.tokenizer import Tokenizer

    path = resolve_model_path(name)
    tokenizer = Tokenizer.from_model_path(Path(path), eos_token_ids)
    if tokenizer is None:
        raise ModelLoadError(f"tokenizer: {path} holds no tokenizer files")
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer: {path} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"{vocab_size}")
    return tokenizer


def _kv_budget(device: Any, util: float) -> int:
    """vLLM's rule: everything on the device (weights, KV cache, others' use) stays under
    ``util`` x its total memory."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    budget = int(free - (1.0 - util) * total)
    if budget <= 0:
        raise ConfigError(f"gpu_memory_utilization={util}: the device already uses {(total - free) / 2**30:.1f} "
                          f"of {total / 2**30:.1f} GiB, nothing is left for the KV cache; raise it")
    return budget
