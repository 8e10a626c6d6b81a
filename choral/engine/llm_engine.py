"""LLMEngine: a loaded model and the one EngineCore (runner, KV cache, sampler) that runs it.

The engine runs nothing by itself: the Executor (choral/executor/) schedules requests over its
core (``LLM.generate`` and the server both run there), and BatchedExecutor
(choral/conversation/) drives conversations over the same core; the core's lock keeps them apart.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from choral.config import EngineConfig
from choral.engine.draft_model import DraftModel, check_same_tokenizer
from choral.engine.engine_core import EngineCore
from choral.engine.model_runner import ModelRunner, plan_kv_size
from choral.errors import ConfigError, InvalidRequestError
from choral.kv.block_pool import BlockPool
from choral.kv.kv_cache import KvCache
from choral.loader.load import LoadedModel, load_model
from choral.loader.memory import check_fits
from choral.sampling.processors import BatchedLogitsProcessorFn, LogitsProcessorFn, LogitsProcessorRegistry
from choral.sampling.sampler import Sampler
from choral.sampling.structured import GrammarCompiler
from choral.threads import default_num_threads

logger = logging.getLogger(__name__)


class LLMEngine:
    """Owns the loaded model and its :class:`EngineCore`."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        tp = config.tensor_parallel_size
        threads = config.num_threads
        if threads is None and torch.device(config.device).type == "cpu":
            # fewer when other processes hold the cores; tensor-parallel ranks share them
            threads = max(1, default_num_threads() // tp)
        if threads is not None:
            torch.set_num_threads(threads)
        # Rank 0 loads first: a model the ranks cannot split is refused before any process starts.
        split: dict[str, Any] = {"tp_rank": 0, "tp_size": tp} if tp > 1 else {}
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, config.max_model_len,
                                           config.load_weights, config.quantization, **split)
        self._check_split(config)
        self._size_kv(config)
        if tp > 1:  # imported here: one process never loads the process-group code
            from choral.engine.tp_runner import TensorParallelLaunch

            launch = TensorParallelLaunch(config, self.loaded, self.kv_size, torch.get_num_threads())
            try:
                runner: ModelRunner = launch.finish(self.loaded, self.kv_size)
            except BaseException:
                launch.abort()
                raise
        else:
            runner = ModelRunner(self.loaded, self.kv_size, config.attention_backend,
                                 max_loras=config.max_loras if config.enable_lora else 0,
                                 max_lora_rank=config.max_lora_rank)
        self.logits_processors = LogitsProcessorRegistry()
        sampler = Sampler(runner.device, config.seed, self.eos_token_ids, self.logits_processors)
        draft = self._load_draft() if config.draft_model is not None else None
        self.core = EngineCore(runner, KvCache(BlockPool(self.kv_size.num_blocks, config.block_size)), sampler,
                               draft=draft)
        self._grammars: GrammarCompiler | None = None
        logger.info("choral: KV cache %d tokens (%d blocks of %d), %.1f MiB; %d CPU threads",
                    self.kv_size.num_tokens, self.kv_size.num_blocks, config.block_size,
                    self.kv_size.num_bytes / 2**20, torch.get_num_threads())

    def _check_split(self, config: EngineConfig) -> None:
        if self.loaded.tensor_parallel_size != config.tensor_parallel_size:
            raise ConfigError(f"tensor_parallel_size: the loaded weights are split for "
                              f"{self.loaded.tensor_parallel_size} rank(s), the engine is configured for "
                              f"{config.tensor_parallel_size}; load the model again")

    def _size_kv(self, config: EngineConfig) -> None:
        """The context limit and the KV pool's size (every rank's pool has as many blocks)."""
        spec = self.loaded.spec
        self.max_model_len = config.max_model_len or spec.max_position_embeddings
        if self.max_model_len > spec.max_position_embeddings:
            raise ConfigError(
                f"max_model_len: {self.max_model_len} exceeds the model's context "
                f"{spec.max_position_embeddings}"
            )
        self.kv_size = plan_kv_size(self.loaded, config.block_size, config.kv_cache_tokens,
                                    config.kv_cache_memory_bytes, self.max_model_len)
        if self.kv_size.num_tokens < self.max_model_len:
            raise ConfigError(
                f"kv_cache_tokens: the KV cache holds {self.kv_size.num_tokens} tokens, fewer than "
                f"max_model_len {self.max_model_len}; raise the cache or lower max_model_len"
            )
        check_fits({"KV cache": self.kv_size.num_bytes}, self.loaded.model.device,
                   "lower kv_cache_tokens (or kv_cache_memory_bytes) or max_model_len")

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine cannot step afterwards). With one
        process there is nothing to release: the engine lives until garbage collection."""
        self.core.runner.close()

    def _load_draft(self) -> DraftModel:
        """The draft model (config.draft_model), checked to share the target's tokenizer, with a
        KV cache of as many tokens as the target's."""
        config = self.config
        assert config.draft_model is not None
        draft = load_model(config.draft_model, config.dtype, config.device, self.max_model_len,
                           config.draft_weights, None)
        check_same_tokenizer(self.loaded, draft, config.draft_model)
        if draft.spec.max_position_embeddings < self.max_model_len:
            raise ConfigError(f"draft_model: its context {draft.spec.max_position_embeddings} is shorter than "
                              f"max_model_len {self.max_model_len}")
        size = plan_kv_size(draft, config.block_size, self.kv_size.num_tokens, None, self.max_model_len)
        check_fits({"draft KV cache": size.num_bytes}, draft.model.device, "lower kv_cache_tokens or max_model_len")
        runner = ModelRunner(draft, size, config.attention_backend)
        logger.info("choral: draft model %s, KV cache %d tokens, %.1f MiB", config.draft_model, size.num_tokens,
                    size.num_bytes / 2**20)
        return DraftModel(config.draft_model, runner, KvCache(BlockPool(size.num_blocks, config.block_size)),
                          self.loaded.spec.vocab_size)

    @property
    def pool(self) -> BlockPool:
        """The core's block pool, for single-threaded inspection (tests, tools)."""
        return self.core.kv.pool

    @property
    def runner(self) -> ModelRunner:
        """The core's model runner, for single-threaded tools and tests (see EngineCore.runner)."""
        return self.core.runner

    @property
    def sampler(self) -> Sampler:
        return self.core.sampler

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.loaded.tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.loaded.eos_token_ids

    def register_logits_processor(self, name: str, fn: LogitsProcessorFn | BatchedLogitsProcessorFn,
                                  batched: bool = False) -> None:
        """Make ``name`` usable in ``SamplingParams.logits_processors`` (see choral/sampling/processors.py)."""
        if batched:
            self.logits_processors.register_batched(name, fn)  # type: ignore[arg-type]
        else:
            self.logits_processors.register(name, fn)  # type: ignore[arg-type]

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler (built on first use: it needs the model's tokenizer)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise InvalidRequestError("json_schema: structured output needs the model's tokenizer")
            self._grammars = GrammarCompiler(self.tokenizer.hf_tokenizer, self.loaded.spec.vocab_size)
        return self._grammars
