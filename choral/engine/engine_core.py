"""EngineCore: the one owner of the model runner (every tensor), the KV cache and the sampler.

Every driver is a client of one core: the executor's loop thread, ``LLM.generate`` (through that
executor), ``BatchedExecutor`` and its conversations, ``ChatSession`` and the server. The core
has one re-entrant ``lock``; every method here takes it, and a driver holds it across its own
read-decide-commit sequence (the executor: schedule -> step -> update; a conversation batch:
allocate -> step -> record), so two drivers on one core never interleave inside a step and a
block is never allocated twice.

The step is synchronous and plain data: ``step(StepPlan) -> StepOutput``. Sampling is a second
call (``sample``), because what to sample (forks for n / best_of, beam search) depends on the
driver; it runs under the same lock, since the sampler's generator and the rows' grammars are
state.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from choral.engine.draft_model import DraftModel
from choral.engine.model_runner import ModelRunner
from choral.engine.step import StepOutput, StepPlan
from choral.kv.kv_cache import KvCache, KvUsage
from choral.lora.adapter import LoraAdapter
from choral.lora.registry import LoraRegistry
from choral.sampling.sampler import Sampler, SampleResult, SamplingRow


class EngineCore:
    """Runs steps over one model runner, one KV cache and one sampler, under one lock."""

    def __init__(self, runner: ModelRunner, kv: KvCache, sampler: Sampler, loras: LoraRegistry | None = None,
                 draft: DraftModel | None = None):
        self.lock = threading.RLock()
        self.kv = kv  # bookkeeping: call only while holding ``lock``
        self._runner = runner
        self._sampler = sampler
        # Speculative decoding's draft model: its own runner and KV cache (choral/engine/draft_model.py),
        # driven by the executor's scheduler under ``lock``. None without one.
        self.draft = draft
        slots = runner.lora_slots
        # The adapters loaded by name (its own lock: intake resolves names on callers' threads).
        self.loras = loras or LoraRegistry(runner.spec, slots is not None, slots.max_rank if slots else 0)

    # ---- adapters (choral/lora/) -------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> LoraAdapter:
        """Load the PEFT adapter at ``path`` as ``name`` (checked against the model)."""
        return self.loras.load(name, path)

    def add_lora(self, adapter: LoraAdapter) -> LoraAdapter:
        """Register an adapter built in memory (see choral.lora.adapter.adapter_from_tensors)."""
        return self.loras.add(adapter)

    def unload_lora(self, name: str) -> LoraAdapter:
        """Forget ``name`` and free its device slot; requests already running with it finish
        with it (they copy it into a slot again if needed)."""
        adapter = self.loras.unload(name)
        with self.lock:
            if self._runner.lora_slots is not None:
                self._runner.lora_slots.drop(adapter.adapter_id)
        return adapter

    @property
    def device(self) -> torch.device:
        return self._runner.device

    @property
    def runner(self) -> ModelRunner:
        """The model runner, for single-threaded tools and tests (parity checks). Drivers go
        through :meth:`step` and the K/V methods below, which take the lock."""
        return self._runner

    @property
    def sampler(self) -> Sampler:
        """The sampler, for single-threaded tools and tests; drivers call :meth:`sample`."""
        return self._sampler

    # ---- the step --------------------------------------------------------------------------
    def step(self, plan: StepPlan) -> StepOutput:
        """Make the plan's block copies, then run its chunks as one forward (hidden states too
        when a chunk asks for them: embeddings)."""
        with self.lock:
            self._runner.copy_blocks(plan.copies)
            if not plan.chunks:
                return StepOutput([], [])
            if any(chunk.hidden != "none" for chunk in plan.chunks):
                logits, hidden = self._runner.execute_with_hidden(plan.chunks)
                return StepOutput(logits, hidden)
            return StepOutput(self._runner.execute(plan.chunks), [None] * len(plan.chunks))

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               want_logprobs: Sequence[bool] | None = None) -> SampleResult:
        """logits [B, V] -> one token per row (advances each row's grammar and generator)."""
        with self.lock:
            return self._sampler.sample(logits, rows, want_logprobs)

    def process(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The sampler's logits transforms only (beam search ranks the processed logprobs)."""
        with self.lock:
            return self._sampler.process(logits, rows)

    # ---- direct K/V access (conversations: context shift, save and load) --------------------
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        with self.lock:
            self._runner.copy_blocks(copies)

    def read_tokens(self, block_table: list[int], count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K and V of cache indices ``0 .. count - 1``: per layer two [count, KVH, D] tensors."""
        with self.lock:
            return self._runner.read_tokens(block_table, count)

    def write_tokens(self, block_table: list[int], start: int, keys: list[torch.Tensor],
                     values: list[torch.Tensor]) -> None:
        """Store per-layer K/V ([count, KVH, D] each) at cache indices ``start ..``."""
        with self.lock:
            self._runner.write_tokens(block_table, start, keys, values)

    def move_tokens(self, block_table: list[int], src_start: int, dst_start: int, count: int) -> None:
        """Move ``count`` tokens' K/V within one table, keys re-rotated (the context shift)."""
        with self.lock:
            self._runner.move_tokens(block_table, src_start, dst_start, count)

    # ---- observers (any thread) -----------------------------------------------------------
    def usage(self) -> KvUsage:
        """The KV pool's counters, read under the lock (the server's /metrics, stats)."""
        with self.lock:
            return self.kv.usage()

    def take_kv_events(self) -> list[tuple[str, int, int]]:
        """(kind, block id, block hash) events recorded since the last call."""
        with self.lock:
            events = self.kv.pool.stats.events
            out = list(events)
            events.clear()
            return out
