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
from choral.engine.fanout import BeamGroup, fork
from choral.engine.model_runner import Chunk, ModelRunner, plan_kv_size
from choral.engine.outputs import RequestOutput, request_output
from choral.engine.prompts import validate_token_ids
from choral.engine.sequence import Sequence, SequenceStatus
from choral.errors import ConfigError, InvalidRequestError
from choral.kv.block_pool import BlockPool
from choral.loader.load import LoadedModel, load_model
from choral.sampling.beam_search import BeamSearch
from choral.sampling.logits_process import bad_word_token_ids
from choral.sampling.params import SamplingParams
from choral.sampling.processors import BatchedLogitsProcessorFn, LogitsProcessorFn, LogitsProcessorRegistry
from choral.sampling.sampler import Sampler
from choral.sampling.structured import GrammarCompiler

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
        self.logits_processors = LogitsProcessorRegistry()
        self.sampler = Sampler(self.runner.device, config.seed, self.eos_token_ids, self.logits_processors)
        self._grammars: GrammarCompiler | None = None
        self._pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the next forward
        self._preempted_now: set[int] = set()  # seq ids preempted in the current step
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

    def register_logits_processor(self, name: str, fn: LogitsProcessorFn | BatchedLogitsProcessorFn,
                                  batched: bool = False) -> None:
        """Make ``name`` usable in ``SamplingParams.logits_processors`` (see choral/sampling/processors.py)."""
        if batched:
            self.logits_processors.register_batched(name, fn)  # type: ignore[arg-type]
        else:
            self.logits_processors.register(name, fn)  # type: ignore[arg-type]

    def new_sequence(self, token_ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        """Validate and wrap a prompt (the root of its request). Raises before anything is allocated."""
        validate_token_ids(token_ids, self.loaded.spec.vocab_size, self.max_model_len)
        self.logits_processors.check(params.logits_processors)
        seq = Sequence(self._next_seq_id, list(token_ids), params, request_id=request_id,
                       bad_words=bad_word_token_ids(params.bad_words, self.tokenizer))
        if params.structured:
            seq.grammar = self._grammar_compiler().matcher(params)
        self._next_seq_id += 1
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        if params.beam_width > 1:
            seq.beam = self._beam_group(seq)
        else:
            seq.num_pending_forks = params.num_samples - 1
        return seq

    def _beam_group(self, root: Sequence) -> BeamGroup:
        params = root.params
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        limit = min(params.max_tokens, self.max_model_len - root.num_prompt_tokens)
        search = BeamSearch(params.beam_width, params.length_penalty, params.early_stopping, limit, sorted(ends))
        return BeamGroup(root, search)

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            if self.tokenizer is None:
                raise InvalidRequestError("json_schema: structured output needs the model's tokenizer")
            self._grammars = GrammarCompiler(self.tokenizer.hf_tokenizer, self.loaded.spec.vocab_size)
        return self._grammars

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
        self._preempted_now = set()  # preempted in this step: neither run nor re-admitted in it
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
            if not self.pool.can_allocate(self._blocks_needed(seq, n)):
                continue
            self._allocate(seq, n)
            scheduled.append((seq, n))
            budget -= n
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            seq = waiting[0]
            if seq.seq_id in self._preempted_now:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.pool.can_allocate(self._blocks_needed(seq, n)):
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
        # A beam request preempted while scheduling takes every one of its beams with it.
        return self._execute([(s, n) for s, n in scheduled
                              if s in running and s.seq_id not in self._preempted_now], running)

    def _reserve(self, seq: Sequence, n: int, running: list[Sequence], waiting: deque[Sequence]) -> bool:
        need = self._blocks_needed(seq, n)
        while not self.pool.can_allocate(need):
            self._preempt(self._victim(seq, running), running, waiting)
            if seq not in running:  # preempted itself (or its beam-search request)
                return False
            need = self._blocks_needed(seq, n)  # a freed fork may have unshared seq's last block
        self._allocate(seq, n)
        return True

    @staticmethod
    def _victim(seq: Sequence, running: list[Sequence]) -> Sequence:
        """The newest request's newest sequence, other requests than ``seq``'s first: a request
        must not preempt its own forks while another could yield (n > 1 and beams would thrash)."""
        own = (seq.root or seq).seq_id
        others = [s for s in running if (s.root or s).seq_id != own]
        return max(others or running, key=lambda s: ((s.root or s).seq_id, s.seq_id))

    def _preempt(self, seq: Sequence, running: list[Sequence], waiting: deque[Sequence]) -> None:
        root = seq.root or seq
        if root.beam is not None:
            self._preempted_now.update(s.seq_id for s in [root, *root.beam.live])
            self._restart_beam_search(root, running, waiting)
            return
        self._preempted_now.add(seq.seq_id)
        # Recompute preemption: drop the cache, keep the tokens, go back to the queue's front.
        running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        waiting.appendleft(seq)

    def _restart_beam_search(self, root: Sequence, running: list[Sequence], waiting: deque[Sequence]) -> None:
        """Preempt a beam-search request as a whole: free every beam and start again from the
        prompt. Beam search is deterministic, so the result is the same; preempting one beam
        instead would lose its shared blocks and could leave the others waiting for it forever."""
        freed: set[int] = set()
        for beam in root.beam.live if root.beam is not None else []:
            if beam in running:
                running.remove(beam)
            freed.update(beam.block_table)
            self.pool.free(beam.block_table)
            beam.block_table = []
            beam.status = SequenceStatus.FINISHED
        self._pending_copies = [(src, dst) for src, dst in self._pending_copies if dst not in freed]
        root.token_ids = list(root.prompt_token_ids)
        root.num_computed_tokens = 0
        root.forks = []
        root.status = SequenceStatus.WAITING
        root.num_preemptions += 1
        root.beam = self._beam_group(root)
        waiting.appendleft(root)

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index in the block table of a shared block the next token would be written into."""
        index = seq.num_computed_tokens // self.pool.block_size
        if index < len(seq.block_table) and self.pool.needs_copy_on_write(seq.block_table[index]):
            return index
        return None

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return seq.blocks_needed(n, self.pool.block_size) + (self._shared_write_block(seq) is not None)

    def _allocate(self, seq: Sequence, n: int) -> None:
        index = self._shared_write_block(seq)
        if index is not None:  # a fork's shared partial block: copy it before writing (copy-on-write)
            old = seq.block_table[index]
            seq.block_table[index] = self.pool.copy_on_write(old)
            self._pending_copies.append((old, seq.block_table[index]))
        seq.block_table.extend(self.pool.allocate(seq.blocks_needed(n, self.pool.block_size)))

    def _execute(self, scheduled: list[tuple[Sequence, int]], running: list[Sequence]) -> list[Sequence]:
        """One forward, then sampling. Returns the roots of requests that finished."""
        chunks = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            wants_prompt_logprobs = (seq.params.prompt_logprobs is not None and seq.root is None
                                     and len(seq.prompt_logprobs) < seq.num_prompt_tokens)
            completes = start + n == seq.num_tokens
            mode = "all" if wants_prompt_logprobs else ("last" if completes else "none")
            chunks.append(Chunk(seq.token_ids[start : start + n], start, seq.block_table, logits=mode))
        self.runner.copy_blocks(self._pending_copies)
        self._pending_copies = []
        results = self.runner.execute(chunks)
        to_sample: list[Sequence] = []
        rows: list[torch.Tensor] = []
        beams: dict[int, dict[int, torch.Tensor]] = {}  # root seq_id -> {seq_id: logits [V]}
        for (seq, n), chunk, logits in zip(scheduled, chunks, results, strict=True):
            start = seq.num_computed_tokens
            seq.num_computed_tokens += n
            if logits is not None and chunk.logits == "all":
                self._record_prompt_logprobs(seq, start, logits)
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            assert logits is not None
            root = seq.root or seq
            if root.beam is not None:
                beams.setdefault(root.seq_id, {})[seq.seq_id] = logits[-1]
                continue
            to_sample.append(seq)
            rows.append(logits[-1])
            for _ in range(seq.num_pending_forks):  # n > 1: the other samples share this prompt's KV
                to_sample.append(self._fork(seq, running))
                rows.append(logits[-1])
            seq.num_pending_forks = 0
        finished: list[Sequence] = []
        for root_id, logits_by_seq in beams.items():
            finished.extend(self._beam_step(root_id, logits_by_seq, scheduled, running))
        if to_sample:
            want = [s.params.num_samples > s.params.n for s in to_sample]  # best_of ranks by logprob
            result = self.sampler.sample(torch.stack(rows), to_sample, want)
            for seq, token, lp in zip(to_sample, result.token_ids, result.logprobs, strict=True):
                seq.token_ids.append(token)
                if lp is not None:
                    seq.cumulative_logprob += lp[0]
                    if seq.params.logprobs is not None:
                        seq.output_logprobs.append(lp)
                if self._check_stop(seq, token):
                    self._release(seq, running)
                    root = seq.root or seq
                    if root.request_finished:
                        finished.append(root)
        return finished

    def _fork(self, seq: Sequence, running: list[Sequence]) -> Sequence:
        root = seq.root or seq
        child = fork(seq, self._next_seq_id, len(root.forks) + 1, self.pool)
        self._next_seq_id += 1
        running.append(child)
        return child

    def _release(self, seq: Sequence, running: list[Sequence]) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in running:
            running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []

    def _beam_step(self, root_id: int, logits_by_seq: dict[int, torch.Tensor],
                   scheduled: list[tuple[Sequence, int]], running: list[Sequence]) -> list[Sequence]:
        """Advance one beam-search request once every live beam has its logits this step."""
        root = next(s.root or s for s, _ in scheduled if (s.root or s).seq_id == root_id)
        group = root.beam
        assert group is not None
        live = group.live
        if any(seq.seq_id not in logits_by_seq for seq in live):
            # A beam was preempted: the others recompute their last token next step to stay in step.
            for seq in live:
                if seq.seq_id in logits_by_seq:
                    seq.num_computed_tokens -= 1
            return []
        processed = self.sampler.process(torch.stack([logits_by_seq[s.seq_id] for s in live]), live)
        logprobs = dict(zip([s.seq_id for s in live], processed.log_softmax(-1), strict=True))
        forked, dropped = group.advance(logprobs, lambda parent: self._fork(parent, running))
        for seq in dropped:
            self._release(seq, running)
        if not group.search.done:
            return []
        for seq in group.live:
            self._release(seq, running)
        root.status = SequenceStatus.FINISHED
        return [root]

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
        """The request rooted at ``seq`` as a RequestOutput (one CompletionOutput per sample/beam)."""
        return request_output(seq, request_id, prompt, self.tokenizer, self.eos_token_ids)
