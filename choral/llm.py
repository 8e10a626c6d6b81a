"""``LLM``: the offline, vLLM-shaped entry point. ``LLM(model=...).generate(prompts, params)``.

``generate`` runs on an :class:`~choral.executor.Executor` over the LLM's engine: the same
continuous batching, chunked prefill, preemption, n / best_of forks and beam search as the server.
"""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Sequence
from typing import Any

from choral.config import DEFAULT_MODEL
from choral.engine.prompts import is_single_prompt, is_token_list, to_token_ids
from choral.engine.soft_prompt import SoftPrompt
from choral.errors import ConfigError, InvalidRequestError
from choral.executor.config import ExecutorConfig
from choral.executor.executor import Executor
from choral.executor.request import Request, Response
from choral.outputs import RequestOutput, request_output
from choral.sampling.params import SamplingParams
from choral.speculative.config import SpeculativeConfig
from choral.tokenizer import Tokenizer
from choral.vllm_options import VllmOptions, build_engine, engine_config

_POLL_S = 0.5  # how often generate() checks that the executor loop is alive while it waits


class LLM:
    """Load a model and generate from batches of prompts. Takes vLLM's ``LLM(...)`` options.

    Args:
        model: a bundled model name, a ``.gguf`` file or an HF model directory.
        tokenizer: another tokenizer (an HF directory or a ``.gguf`` file); default: the model's.
        skip_tokenizer_init: load no tokenizer (prompts must be token ids; outputs carry no text).
        dtype: ``auto``, ``float32`` (``float``), ``bfloat16``, ``float16`` (``half``) or a torch dtype.
        seed: seed of the engine's default random generator.
        max_model_len, max_num_seqs, max_num_batched_tokens, block_size: as vLLM's.
        enable_prefix_caching: reuse the KV of prompt prefixes seen before (off by default, as
            in vLLM's LLM: every prompt is computed in full, so results never depend on what ran before).
        gpu_memory_utilization: on CUDA, the fraction of the device's memory choral may fill
            (weights included); the KV cache gets what is left. On the CPU it has no meaning: the
            KV cache is sized by ``kv_cache_tokens`` / ``kv_cache_memory_bytes`` (a warning says so).
        enforce_eager: accepted; choral always runs eagerly (no graph capture).
        trust_remote_code: accepted; choral never runs code from a model's files.
        tensor_parallel_size: split the model over this many processes (docs/scale-out.md); 1 by default.
        pipeline_parallel_size: 1 (pipeline parallelism is not supported).
        quantization: ``q8_0`` or ``q4_0`` (EngineConfig.quantization: quantize at load, run natively).
        device, kv_cache_tokens, kv_cache_memory_bytes, num_threads, attention_backend: choral's own
            :class:`~choral.config.EngineConfig` fields. An unknown keyword is an error.

    The executor behind ``generate`` starts on first use and lives until :meth:`close` (or the
    end of a ``with LLM(...) as llm:`` block, or garbage collection).
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, tokenizer: str | None = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, dtype: Any = "auto", quantization: str | None = None,
                 seed: int | None = None, gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
                 enable_prefix_caching: bool = False, kv_cache_dtype: str = "auto", revision: str | None = None,
                 tokenizer_revision: str | None = None, download_dir: str | None = None, load_format: str = "auto",
                 enable_chunked_prefill: bool | None = None,
                 speculative_config: SpeculativeConfig | dict[str, Any] | None = None, **options: Any):
        vllm = VllmOptions(tokenizer=tokenizer, tokenizer_mode=tokenizer_mode, skip_tokenizer_init=skip_tokenizer_init,
                           trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                           pipeline_parallel_size=pipeline_parallel_size, quantization=quantization,
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           kv_cache_dtype=kv_cache_dtype, revision=revision, tokenizer_revision=tokenizer_revision,
                           download_dir=download_dir, load_format=load_format,
                           enable_chunked_prefill=enable_chunked_prefill)
        speculative = None  # checked before the model loads
        if speculative_config is not None:
            try:
                speculative = SpeculativeConfig.coerce(speculative_config)
            except InvalidRequestError as e:
                raise ConfigError(f"speculative_config: {e}") from None
            if speculative.model is not None:  # vLLM's {"model": PATH, ...}: the engine loads that draft
                if options.get("draft_model", speculative.model) != speculative.model:
                    raise ConfigError(f"speculative_config: model {speculative.model!r} and draft_model "
                                      f"{options['draft_model']!r} differ; give one")
                options = {**options, "draft_model": speculative.model}
        self.config = engine_config(model, dtype, seed, vllm, options)
        self.engine = build_engine(self.config, vllm)
        # generate() queues every prompt at once, and validates them all before queueing any.
        self._executor_config = ExecutorConfig(enable_prefix_cache=bool(enable_prefix_caching),
                                               max_queue_size=sys.maxsize, speculative=speculative)
        self._executor: Executor | None = None

    def get_tokenizer(self) -> Any:
        """The model's transformers tokenizer (as vLLM's ``get_tokenizer``): ``encode``, ``decode``,
        ``apply_chat_template`` and the rest of its API."""
        if self.tokenizer is None:
            raise ConfigError("this LLM has no tokenizer (skip_tokenizer_init=True, or the model ships none)")
        return self.tokenizer.hf_tokenizer

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def executor(self) -> Executor:
        """The executor that runs ``generate`` (started on first use). Usable directly too: for
        streaming, priorities, cancellation."""
        if self._executor is None or not self._executor.is_running:
            self._executor = Executor(self.engine, self._executor_config)
        return self._executor

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: Any = None,
        priority: Sequence[int] | None = None,
        lora: str | Sequence[str | None] | None = None,
        soft_prompt: SoftPrompt | Sequence[SoftPrompt | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list. A prompt is text, a list of token ids, a list of
        chat messages (``{"role", "content"}`` dicts, rendered with the model's chat template), or
        a vLLM prompt dict (``{"prompt": text}`` or ``{"prompt_token_ids": [...]}``).

        ``priority`` (one int per prompt) orders the work as vLLM's priority scheduling does:
        a lower value runs first. Returns one :class:`RequestOutput` per prompt, in order. Every
        prompt is validated before any work starts: a bad one raises and nothing runs.

        ``lora`` names a loaded adapter (:meth:`load_lora`) for every prompt, or gives one name
        (or None) per prompt; ``lora_request`` is vLLM's ``LoRARequest`` (or one per prompt),
        loaded from its ``lora_path`` on first use. Give one of the two (docs/lora.md).

        ``soft_prompt`` (one, or one per prompt) replaces placeholder positions of the prompt
        with its vectors (prompt tuning); a ``{"prompt_embeds": tensor [n, hidden]}`` prompt is
        made of embeddings only (vLLM's prompt_embeds).
        """
        items = [prompts] if is_single_prompt(prompts) else list(prompts)
        if not items:
            return []
        adapters = self._loras_per_prompt(lora, lora_request, len(items))
        softs = self._soft_prompts(items, soft_prompt)
        params = self._params_per_prompt(sampling_params, len(items))
        priorities = self._priorities(priority, len(items))
        # The executor applies truncate_prompt_tokens. A chat prompt's text is the rendered template (vLLM's).
        encoded = [to_token_ids(p, self.tokenizer) for p in items]
        encoded = [(self.tokenizer.decode(ids, False) if text is None and self.tokenizer is not None
                    and not is_token_list(item) else text, ids)
                   for item, (text, ids) in zip(items, encoded, strict=True)]
        finished: queue.SimpleQueue[int] = queue.SimpleQueue()  # request ids, as they finish

        def on_response(response: Response) -> None:  # called on the executor's thread
            if response.has_error or (response.result is not None and response.result.is_final):
                finished.put(response.request_id)  # poll() returns the Completion or raises the error

        # vLLM: a lower priority value runs first; the executor runs higher values first.
        requests = [Request(ids, sp, priority=-float(pri), callback=on_response, lora=name, soft_prompt=soft)
                    for (_, ids), sp, pri, name, soft in zip(encoded, params, priorities, adapters, softs, strict=True)]
        executor = self.executor
        ids = executor.submit_many(requests)
        position = {rid: i for i, rid in enumerate(ids)}
        outputs: dict[int, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        started = time.perf_counter()
        generated = 0
        try:
            while len(outputs) < len(ids):
                try:
                    rid = finished.get(timeout=_POLL_S)
                except queue.Empty:
                    if executor.is_running:
                        continue
                    rid = next(r for r in ids if position[r] not in outputs)  # poll raises the loop's error
                if position[rid] in outputs:
                    continue
                completion = executor.poll(rid, timeout=None)
                assert completion is not None
                i = position[rid]
                outputs[i] = request_output(completion, str(rid), encoded[i][0], params[i], self.tokenizer)
                generated += sum(len(o.token_ids) for o in completion.outputs)
                if bar is not None:
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s")
                    bar.update(1)
        except BaseException:
            # Interrupted (Ctrl-C) or failed: stop what still runs, so its blocks go back.
            for rid in ids:
                if position[rid] not in outputs:
                    executor.cancel(rid)
                    executor.release(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [outputs[i] for i in range(len(ids))]

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: Any = None,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies for one conversation (a list of messages) or a list of them."""
        if messages and all(isinstance(m, dict) for m in messages):
            return self.generate([messages], sampling_params, use_tqdm, lora_request=lora_request, lora=lora)
        return self.generate(list(messages), sampling_params, use_tqdm, lora_request=lora_request, lora=lora)

    @staticmethod
    def _soft_prompts(items: list[Any], soft_prompt: SoftPrompt | Sequence[SoftPrompt | None] | None
                      ) -> list[SoftPrompt | None]:
        """One soft prompt (or None) per prompt; ``{"prompt_embeds": ...}`` items become an empty
        prompt (in ``items``) with their embeddings as the soft prompt."""
        if soft_prompt is None or isinstance(soft_prompt, SoftPrompt):
            softs: list[SoftPrompt | None] = [soft_prompt] * len(items)
        else:
            softs = list(soft_prompt)
            if len(softs) != len(items):
                raise InvalidRequestError(f"soft_prompt: give one or one per prompt ({len(items)}), got {len(softs)}")
        for i, item in enumerate(items):
            if isinstance(item, dict) and "prompt_embeds" in item:
                extra = sorted(set(item) - {"prompt_embeds"})
                if extra:
                    raise InvalidRequestError(f"prompt_embeds: give it alone in its prompt dict, not with {extra}")
                if softs[i] is not None:
                    raise InvalidRequestError("prompt_embeds: a prompt of embeddings takes no soft_prompt")
                softs[i] = SoftPrompt(item["prompt_embeds"])
                items[i] = []
        return softs

    # ---- LoRA adapters (docs/lora.md) ----------------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` as ``name`` (needs ``enable_lora=True``): a PEFT directory
        (adapter_config.json + adapter_model.safetensors) or a GGUF LoRA file (llama.cpp's format)."""
        self.engine.core.load_lora(name, str(path))

    def unload_lora(self, name: str) -> None:
        """Forget adapter ``name``; requests already running with it finish with it."""
        self.engine.core.unload_lora(name)

    def list_loras(self) -> list[str]:
        """The names of the loaded adapters."""
        return self.engine.core.loras.names()

    def _loras_per_prompt(self, lora: str | Sequence[str | None] | None, lora_request: Any,
                          count: int) -> list[str | None]:
        if lora is not None and lora_request is not None:
            raise InvalidRequestError("lora: give lora or lora_request, not both")
        if lora_request is not None:
            requests = list(lora_request) if isinstance(lora_request, list | tuple) else [lora_request] * count
            if len(requests) != count:
                raise InvalidRequestError(f"lora_request: give one or one per prompt ({count}), got {len(requests)}")
            return [self._resolve_lora_request(r) for r in requests]
        if lora is None or isinstance(lora, str):
            return [lora] * count
        names = list(lora)
        if len(names) != count:
            raise InvalidRequestError(f"lora: give one adapter name or one per prompt ({count}), got {len(names)}")
        return names

    def _resolve_lora_request(self, request: Any) -> str | None:
        """vLLM's LoRARequest (lora_name, lora_path): the adapter's name, loaded on first use."""
        if request is None:
            return None
        name, path = getattr(request, "lora_name", None), getattr(request, "lora_path", None)
        if not isinstance(name, str):
            raise InvalidRequestError(f"lora_request: expected a LoRARequest (lora_name, lora_path), got "
                                      f"{type(request).__name__}")
        if name not in self.engine.core.loras.names():
            if not path:
                raise InvalidRequestError(f"lora_request: adapter {name!r} is not loaded and has no lora_path")
            self.engine.core.load_lora(name, str(path))
        return name

    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
            raise InvalidRequestError(
                f"sampling_params: give one SamplingParams or a list of {count}, got {len(params)} items"
            )
        return params

    @staticmethod
    def _priorities(priority: Sequence[int] | None, count: int) -> list[int]:
        if priority is None:
            return [0] * count
        values = list(priority)
        if len(values) != count or not all(isinstance(p, int) and not isinstance(p, bool) for p in values):
            raise InvalidRequestError(f"priority: give one int per prompt ({count}), got {priority!r}")
        return values

    def register_logits_processor(self, name: str, fn: Any, batched: bool = False) -> None:
        """Register a logits processor that requests pick by name (``SamplingParams.logits_processors``):
        ``fn(request_id, logits[V], token_ids) -> logits``, or with ``batched=True``
        ``fn(request_ids, logits[R, V], token_ids_per_row) -> logits``."""
        self.engine.register_logits_processor(name, fn, batched)

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the executor (what still runs is cancelled). A later ``generate`` starts a new one,
        except under tensor parallelism: there ``close`` also stops the worker processes, and the
        LLM cannot generate afterwards."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        if self.engine.config.tensor_parallel_size > 1:
            self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter exit the loop thread (a daemon) may already be frozen: joining it would hang.
        if sys.is_finalizing():
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing useful to do with an error in a finalizer
            pass


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
