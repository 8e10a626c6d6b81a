"""BatchedExecutor: many conversations over one model and one shared paged KV cache.

The user drives the loop (as in LLamaSharp): ``create()`` conversations, ``prompt()`` them,
``infer()`` once to compute every pending token of every conversation in one batched forward,
then ``sample()`` each and prompt the chosen token. A batch carries at most
``max_num_batched_tokens`` tokens; what does not fit stays queued for the next ``infer()``.

Thread safety: every executor and conversation method takes the engine core's re-entrant lock,
so calls from several threads are *serialized* (a prompt issued during an ``infer()`` waits for
it), and so are the steps of an Executor on the same core (an ``LLM``'s ``generate``): one
batch allocates, runs and records while the other waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from choral.config import DEFAULT_MODEL, EngineConfig
from choral.conversation.context_shift import ContextShift
from choral.conversation.conversation import Conversation
from choral.conversation.state import SavedAdapter, State, StateSpec, decode_state, model_fingerprint
from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from choral.engine.step import StepPlan
from choral.errors import (
    ConfigError,
    ExecutorClosedError,
    IncompatibleStateError,
    InvalidRequestError,
    KvCacheExhaustedError,
)
from choral.lora.adapter import LoraAdapter
from choral.tokenizer import Tokenizer


class DecodeResult(enum.Enum):
    """What ``infer()`` did. On anything but OK nothing changed: the batch stays queued."""

    OK = "ok"
    NO_KV_SLOT = "no_kv_slot"  # not enough free blocks: close a conversation, call infer() again
    CANCELLED = "cancelled"  # the cancel token was set before the forward started


class CancelToken:
    """A thread-safe flag for ``infer(cancel=...)`` and chat turns."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


# Options that describe the loaded weights: an executor built on a loaded model cannot change them.
_WEIGHT_OPTIONS = ("model", "dtype", "device")


def _build_engine(model: Any, options: dict[str, Any]) -> LLMEngine:
    from choral.llm import LLM

    if isinstance(model, LLM):
        model = model.engine
    if isinstance(model, str):
        return LLMEngine(EngineConfig.from_kwargs(model=model, **options))
    if not isinstance(model, LLMEngine):
        raise ConfigError(f"model: expected a model name or path, an LLM or an LLMEngine, got {type(model).__name__}")
    if not options:
        return model  # share its pool, runner and sampler
    EngineConfig.from_kwargs(**options)  # unknown names are an error
    if model.loaded.tensor_parallel_size > 1 or options.get("tensor_parallel_size", 1) > 1:
        raise ConfigError(f"{', '.join(sorted(options))}: a BatchedExecutor over a tensor-parallel engine shares "
                          "its KV cache and workers; pass no options (or load a new engine with them)")
    fixed = sorted(set(options) & set(_WEIGHT_OPTIONS))
    if fixed:
        raise ConfigError(f"{', '.join(fixed)}: fixed by the loaded model; load a new one to change it")
    config = dataclasses.replace(model.config, **options)
    positions = model.loaded.model.rotary.cos.shape[0]
    if config.max_model_len is not None and config.max_model_len > positions:
        raise ConfigError(f"max_model_len: the loaded model was prepared for {positions} positions")
    return LLMEngine(config, loaded=model.loaded)


class BatchedExecutor:
    """Runs many conversations in shared batches over one KV cache.

    Args:
        model: a model name or path (loaded here with ``options``), or an ``LLM`` / ``LLMEngine``.
            Given a loaded one and no options, the executor shares its KV cache; with options
            (``kv_cache_tokens``, ``block_size``, ``max_num_batched_tokens``...) it reuses the
            weights and builds its own cache.
    """

    def __init__(self, model: Any = DEFAULT_MODEL, **options: Any):
        self._engine = _build_engine(model, options)
        # An engine built here is ours to close (its tensor-parallel workers, if any).
        self._owns_engine = isinstance(model, str)
        self._lock = self._engine.core.lock  # shared with every other client of the core
        self._conversations: dict[int, Conversation] = {}
        self._queue: list[Conversation] = []  # conversations with pending tokens, in prompt order
        self._next_id = 0
        self._closed = False
        self._inflight: asyncio.Future[DecodeResult] | None = None
        loaded = self._engine.loaded
        layers = loaded.model.layers
        sample = [loaded.model.embed_tokens(torch.arange(16)), loaded.model.final_norm, layers[0].input_norm,
                  layers[-1].post_norm]
        self.fingerprint = model_fingerprint(loaded.spec.fingerprint(), loaded.model.dtype, sample,
                                             loaded.weights_mode)

    # ---- properties --------------------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        return self._engine

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._engine.loaded.spec.vocab_size

    @property
    def max_context(self) -> int:
        """Tokens one conversation may hold (the engine's ``max_model_len``)."""
        return self._engine.max_model_len

    @property
    def max_batch_tokens(self) -> int:
        return self._engine.config.max_num_batched_tokens

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def batched_token_count(self) -> int:
        """Tokens waiting for ``infer()``, over all conversations."""
        with self._lock:
            return sum(c.num_pending_tokens for c in self._queue)

    @property
    def batch_queue_count(self) -> int:
        """``infer()`` calls needed to compute everything pending."""
        return -(-self.batched_token_count // self.max_batch_tokens)

    @property
    def conversations(self) -> list[Conversation]:
        """The open conversations, oldest first."""
        with self._lock:
            return list(self._conversations.values())

    def _check_open(self) -> None:
        if self._closed:
            raise ExecutorClosedError("the BatchedExecutor is closed")

    # ---- adapters (docs/lora.md) ------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` (a PEFT directory or a GGUF LoRA file) as ``name`` (the engine
        needs ``enable_lora=True``);
        the same registry as the LLM / executor sharing this engine."""
        self._engine.core.load_lora(name, str(path))

    def unload_lora(self, name: str) -> None:
        """Forget adapter ``name``; conversations created with it keep it."""
        self._engine.core.unload_lora(name)

    # ---- conversations -----------------------------------------------------------------------
    def create(self, context_shift: ContextShift | None = None, lora: str | None = None) -> Conversation:
        """A new, empty conversation (optionally with automatic context shift), running with the
        loaded LoRA adapter named ``lora`` (the engine's ``load_lora``); its forks keep it."""
        with self._lock:
            self._check_open()
            adapter = self._engine.core.loras.get(lora) if lora is not None else None
            conversation = self._adopt(context_shift)
            conversation._lora = adapter
            return conversation

    def load(self, source: str | Path | State, context_shift: ContextShift | None = None, *,
             key: bytes | None = None) -> Conversation:
        """A conversation from ``Conversation.save`` (a file path or a :class:`State`). Raises a
        StateLoadError for another model, a damaged, malformed or forged file or a newer format;
        nothing is allocated. With ``key``, the state must carry an HMAC made with that key
        (``save(key=...)``): the checksum alone detects damage, not tampering."""
        with self._lock:
            self._check_open()
            if not isinstance(source, State | str | Path):
                raise InvalidRequestError(f"load: expected a path or a State, got {type(source).__name__}")
            state = source if isinstance(source, State) else State.from_file(source)
            spec = self._engine.loaded.spec
            expect = StateSpec(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                               vocab_size=spec.vocab_size, kv_dtype=self._engine.loaded.model.dtype,
                               max_tokens=self.max_context)
            saved = decode_state(state, self.fingerprint, expect, key=key)
            adapter = self._saved_adapter(saved.lora)
            conversation = self._adopt(context_shift)
            conversation._lora = adapter
            try:
                conversation._load(saved)
            except BaseException:
                conversation.close()
                raise
            return conversation

    def _saved_adapter(self, saved: SavedAdapter | None) -> LoraAdapter | None:
        """The loaded adapter a saved conversation ran with: same name, same weights (its K/V
        were computed with them); IncompatibleStateError otherwise."""
        if saved is None:
            return None
        loras = self._engine.core.loras
        if not loras.enabled or saved.name not in loras.names():
            raise IncompatibleStateError(f"saved conversation runs with LoRA adapter {saved.name!r}, which is not "
                                         "loaded here; load it under that name (load_lora) first")
        adapter = loras.get(saved.name)
        if adapter.digest != saved.sha256:
            raise IncompatibleStateError(f"saved conversation runs with LoRA adapter {saved.name!r}; the adapter "
                                         "loaded under that name here has other weights")
        return adapter

    def _adopt(self, context_shift: ContextShift | None) -> Conversation:
        if context_shift is not None and not isinstance(context_shift, ContextShift):
            raise InvalidRequestError(
                f"context_shift: expected a ContextShift or None, got {type(context_shift).__name__}"
            )
        conversation = Conversation(self, self._next_id, context_shift)
        self._next_id += 1
        self._conversations[conversation.id] = conversation
        return conversation

    def _enqueue(self, conversation: Conversation) -> None:
        if conversation not in self._queue:
            self._queue.append(conversation)

    def _dequeue(self, conversation: Conversation) -> None:
        if conversation in self._queue:
            self._queue.remove(conversation)

    def _forget(self, conversation: Conversation) -> None:
        self._dequeue(conversation)
        self._conversations.pop(conversation.id, None)

    # ---- inference ---------------------------------------------------------------------------
    def infer(self, cancel: CancelToken | None = None) -> DecodeResult:
        """Compute the next batch of pending tokens (all of them when they fit the budget).

        Returns ``NO_KV_SLOT`` without changing anything when the batch needs more free blocks
        than the pool has, and ``CANCELLED`` when ``cancel`` is set before the forward starts.
        """
        with self._lock:
            self._check_open()
            if cancel is not None and not isinstance(cancel, CancelToken):
                raise InvalidRequestError(f"cancel: expected a CancelToken or None, got {type(cancel).__name__}")
            if cancel is not None and cancel.cancelled:
                return DecodeResult.CANCELLED
            batch: list[tuple[Conversation, int, int]] = []  # (conversation, start, count)
            budget = self.max_batch_tokens
            adapters: set[int] = set()  # at most max_loras distinct adapters a batch (device slots)
            for conversation in self._queue:
                if budget == 0:
                    break
                lora = conversation._lora
                if lora is not None and lora.adapter_id not in adapters:
                    if len(adapters) >= self._engine.config.max_loras:
                        continue  # waits for the next infer()
                    adapters.add(lora.adapter_id)
                start, count = conversation._pending_slice(budget)
                batch.append((conversation, start, count))
                budget -= count
            if not batch:
                return DecodeResult.OK
            kv = self._engine.core.kv
            released: Counter[int] = Counter()
            need = sum(kv.slots_needed(c._seq, s, s + n, released) for c, s, n in batch)
            if not kv.can_allocate(need):
                return DecodeResult.NO_KV_SLOT
            chunks, copies = [], []
            for conversation, start, count in batch:
                seq = conversation._seq
                made = kv.allocate_slots(seq, start, start + count)
                assert made is not None, "the batch's blocks were counted above"
                copies.extend(made)
                chunks.append(Chunk(seq.token_ids[start : start + count], start, list(seq.block_table),
                                    logits=conversation._logits_mode(start, count),
                                    hidden=conversation._embeddings.mode, lora=conversation._lora))
            output = self._engine.core.step(StepPlan(chunks, copies))
            for (conversation, _, count), logits, states in zip(batch, output.logits, output.hidden, strict=True):
                conversation._computed(count, logits, states)
                if not conversation.requires_inference:
                    self._dequeue(conversation)
            return DecodeResult.OK

    async def wait_for_logits(self, conversation: Conversation) -> None:
        """Await until ``conversation`` has no pending tokens, running ``infer()`` in a worker
        thread. Coroutines waiting together share each batch: before starting a forward this
        yields to the event loop so every session prompted in the meantime joins it.
        Raises KvCacheExhaustedError on ``NO_KV_SLOT``."""
        loop = asyncio.get_running_loop()
        while conversation.requires_inference:
            future = self._inflight
            if future is not None and future.get_loop() is not loop:
                future = self._inflight = None  # left over from another (finished) event loop
            if future is None:
                for _ in range(3):
                    await asyncio.sleep(0)  # let the other sessions queue their tokens
                if not conversation.requires_inference:
                    return
                future = self._inflight
            if future is None:
                future = asyncio.ensure_future(asyncio.to_thread(self.infer))
                self._inflight = future
                future.add_done_callback(self._clear_inflight)
            result = await asyncio.shield(future)
            if result is DecodeResult.NO_KV_SLOT:
                raise KvCacheExhaustedError(
                    f"KV cache exhausted: the batch needs more than the {self._engine.core.usage().num_free_blocks} "
                    "free block(s); close a conversation and retry"
                )

    def _clear_inflight(self, future: asyncio.Future[DecodeResult]) -> None:
        if self._inflight is future:
            self._inflight = None

    # ---- lifetime ----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert the pool's ref counts equal the open conversations' block tables (tests)."""
        with self._lock:
            self._engine.core.kv.check_integrity(c._seq for c in self._conversations.values())

    def close(self) -> None:
        """Close every conversation (their blocks go back) and refuse further use. Idempotent."""
        with self._lock:
            for conversation in list(self._conversations.values()):
                conversation.close()
            self._closed = True
        if self._owns_engine:
            self._engine.close()

    def __enter__(self) -> BatchedExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
