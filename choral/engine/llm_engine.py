"""LLMEngine: a model, its KV pool and runner, and a simple continuous-batching loop.

Each step packs the decode tokens of running sequences first, then prompt chunks, under the
``max_num_batched_tokens`` / ``max_num_seqs`` budgets. When a decode needs a block and none is
free, the newest running sequence is preempted (its blocks freed, recomputed later). The
full-featured scheduler (priorities, prefix cache, streaming) is the executor's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch

from choral.config import EngineConfig
from choral.engine.model_runner import Chunk, ModelRunner, plan_kv_size
from choral.engine.outputs import CompletionOutput, Logprob, RequestOutput
from choral.engine.prompts import validate_token_ids
from choral.engine.sequence import Sequence, SequenceStatus
from choral.errors import ConfigError
from choral.kv.block_pool import BlockPool
from choral.loader.load import LoadedModel, load_model
from choral.sampling.params import SamplingParams
from choral.sampling.sampler import Sampler

logger = logging.getLogger(__name__)


class LLMEngine:
    """Owns the loaded model, the block pool, the model runner and the sampler."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, config.max_model_len)
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
        self.pool = BlockPool(self.kv_size.num_blocks, config.block_size)
        self.runner = ModelRunner(self.loaded, self.kv_size, config.attention_backend)
        self.sampler = Sampler(self.runner.device, config.seed)
        self._next_seq_id = 0
        logger.info("choral: KV cache %d tokens (%d blocks of %d), %.1f MiB",
                    self.kv_size.num_tokens, self.kv_size.num_blocks, config.block_size,
                    self.kv_size.num_bytes / 2**20)

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.loaded.tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.loaded.eos_token_ids

    def new_sequence(self, token_ids: list[int], params: SamplingParams) -> Sequence:
        """Validate and wrap a prompt. Raises before anything is allocated."""
        validate_token_ids(token_ids, self.loaded.spec.vocab_size, self.max_model_len)
        seq = Sequence(self._next_seq_id, list(token_ids), params)
        self._next_seq_id += 1
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        return seq

    # ---- the loop ------------------------------------------------------------------------
    def run(self, seqs: list[Sequence], on_finish: Callable[[Sequence], None] | None = None) -> None:
        """Run every sequence to completion."""
        waiting: deque[Sequence] = deque(seqs)
        running: list[Sequence] = []
        while waiting or running:
            for seq in self.step(waiting, running):
                if on_finish is not None:
                    on_finish(seq)

    def step(self, waiting: deque[Sequence], running: list[Sequence]) -> list[Sequence]:
        """Schedule, run one forward, sample. Returns the sequences that finished."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        # Decodes first (one token each), oldest first; preempt the newest when blocks run out.
        for seq in [s for s in running if s.num_uncomputed_tokens == 1]:
            if seq not in running or budget == 0:
                continue
            if not self._reserve(seq, 1, running, waiting):
                continue
            scheduled.append((seq, 1))
            budget -= 1
        # Then chunks of prompts already admitted, then newly admitted prompts.
        for seq in [s for s in running if s.num_uncomputed_tokens > 1]:
            if budget == 0:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.pool.can_allocate(seq.blocks_needed(n, self.pool.block_size)):
                continue
            self._allocate(seq, n)
            scheduled.append((seq, n))
            budget -= n
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            seq = waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.pool.can_allocate(seq.blocks_needed(n, self.pool.block_size)):
                break
            waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            running.append(seq)
            self._allocate(seq, n)
            scheduled.append((seq, n))
            budget -= n
        if not scheduled:
            if running or waiting:
                raise RuntimeError("scheduler made no progress (KV cache too small for any sequence)")
            return []
        return self._execute(scheduled, running)

    def _reserve(self, seq: Sequence, n: int, running: list[Sequence], waiting: deque[Sequence]) -> bool:
        need = seq.blocks_needed(n, self.pool.block_size)
        while not self.pool.can_allocate(need):
            victim = running[-1]
            self._preempt(victim, running, waiting)
            if victim is seq:
                return False
        self._allocate(seq, n)
        return True

    def _preempt(self, seq: Sequence, running: list[Sequence], waiting: deque[Sequence]) -> None:
        # Recompute preemption: drop the cache, keep the tokens, go back to the queue's front.
        running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        waiting.appendleft(seq)

    def _allocate(self, seq: Sequence, n: int) -> None:
        seq.block_table.extend(self.pool.allocate(seq.blocks_needed(n, self.pool.block_size)))

    def _execute(self, scheduled: list[tuple[Sequence, int]], running: list[Sequence]) -> list[Sequence]:
        chunks = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            wants_prompt_logprobs = (seq.params.prompt_logprobs is not None
                                     and len(seq.prompt_logprobs) < seq.num_prompt_tokens)
            completes = start + n == seq.num_tokens
            mode = "all" if wants_prompt_logprobs else ("last" if completes else "none")
            chunks.append(Chunk(seq.token_ids[start : start + n], start, seq.block_table, logits=mode))
        results = self.runner.execute(chunks)
        to_sample: list[Sequence] = []
        rows: list[torch.Tensor] = []
        for (seq, n), chunk, logits in zip(scheduled, chunks, results, strict=True):
            start = seq.num_computed_tokens
            seq.num_computed_tokens += n
            if logits is not None and chunk.logits == "all":
                self._record_prompt_logprobs(seq, start, logits)
            if seq.num_computed_tokens == seq.num_tokens:
                assert logits is not None
                to_sample.append(seq)
                rows.append(logits[-1])
        finished: list[Sequence] = []
        if to_sample:
            banned = [self._banned(seq) for seq in to_sample]
            result = self.sampler.sample(torch.stack(rows), [s.params for s in to_sample],
                                         [s.generator for s in to_sample], banned)
            for seq, token, lp in zip(to_sample, result.token_ids, result.logprobs, strict=True):
                seq.token_ids.append(token)
                if lp is not None:
                    seq.output_logprobs.append(lp)
                if self._check_stop(seq, token):
                    running.remove(seq)
                    self.pool.free(seq.block_table)
                    seq.block_table = []
                    finished.append(seq)
        return finished

    def _record_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        # logits row j predicts token start + j + 1; the first prompt token has no logprob.
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        top = seq.params.prompt_logprobs or 0
        logp = logits.log_softmax(-1)
        for j in range(logits.shape[0]):
            target = start + j + 1
            if target >= seq.num_prompt_tokens or len(seq.prompt_logprobs) > target:
                continue
            tok = seq.token_ids[target]
            tops: list[tuple[int, float]] = []
            if top:
                vals, ids = logp[j].topk(top)
                tops = list(zip(ids.tolist(), vals.tolist(), strict=True))
            seq.prompt_logprobs.append((float(logp[j, tok]), tops))

    def _banned(self, seq: Sequence) -> list[int]:
        if seq.num_output_tokens >= seq.params.min_tokens:
            return []
        return [*self.eos_token_ids, *seq.params.stop_token_ids]

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        params = seq.params
        reason: str | None = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif params.stop and self._stop_string(seq) is not None:
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None:
            return False
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return True

    def _stop_string(self, seq: Sequence) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        for stop in seq.params.stop:
            if stop in text:
                return stop
        return None

    # ---- outputs -------------------------------------------------------------------------
    def to_output(self, seq: Sequence, request_id: str, prompt: str | None) -> RequestOutput:
        params = seq.params
        ids = seq.output_token_ids
        text = ""
        stop_reason: int | str | None = None
        if seq.finish_reason == "stop" and ids and ids[-1] in (*params.stop_token_ids, *self.eos_token_ids):
            stop_reason = ids[-1]
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids, params.skip_special_tokens)
            for stop in params.stop:
                cut = text.find(stop)
                if cut >= 0:
                    text, stop_reason = text[:cut], stop
        logprobs: list[Logprob] | None = seq.output_logprobs if params.logprobs is not None else None
        return RequestOutput(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(0, text, ids, seq.finish_reason, stop_reason, logprobs)],
            prompt_logprobs=seq.prompt_logprobs if params.prompt_logprobs is not None else None,
            metrics={"num_preemptions": float(seq.num_preemptions)},
        )
