"""Intake: a Request checked against the model and turned into a Job with its first sequence.

Everything that can be wrong with a request is found here, in the caller's thread, before the
request is queued: the loop never meets a request it cannot run.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from choral.engine.llm_engine import LLMEngine
from choral.engine.prompts import to_token_ids, validate_token_ids
from choral.engine.soft_prompt import SoftTokens, place
from choral.errors import InvalidRequestError
from choral.executor.beams import BeamGroup, beam_search_for
from choral.executor.config import KvPolicy
from choral.executor.job import ExecSequence, Job
from choral.executor.request import Request, Timing
from choral.executor.scheduler import blocks_to_run_alone
from choral.finish import Finisher, FinishReason, StopConditions
from choral.sampling.logits_process import check_token_ids
from choral.speculative.speculator import Speculator


class Intake:
    """Validates requests and makes the sequences of their jobs (the executor's only sequence factory)."""

    def __init__(self, engine: LLMEngine, kv_policy: KvPolicy = KvPolicy.MAX_UTILIZATION,
                 speculator: Speculator | None = None):
        self.engine = engine
        self.kv_policy = kv_policy
        self.speculator = speculator or Speculator()
        self._seq_ids = itertools.count()

    def make_job(self, request: Request, collect: bool) -> Job:
        """A Job for ``request`` (not yet numbered: the executor does that when it accepts it).
        Raises InvalidRequestError (or a subclass) naming what is wrong."""
        if not isinstance(request, Request):
            raise InvalidRequestError(f"expected a Request, got {type(request).__name__}")
        engine = self.engine
        # An unknown adapter (or LoRA off) is refused here, before anything is queued.
        lora = engine.core.loras.get(request.lora) if request.lora is not None else None
        text, token_ids = to_token_ids(request.prompt, engine.tokenizer)
        keep = request.sampling.truncate_prompt_tokens
        if keep is not None and len(token_ids) > keep:
            token_ids = token_ids[-keep:]  # vLLM's truncate_prompt_tokens: the prompt's last k tokens
        soft: SoftTokens | None = None
        if request.soft_prompt is not None:  # its vectors' positions in place (prepended ones added)
            model = engine.loaded.model
            token_ids, soft = place(request.soft_prompt, token_ids, engine.loaded.spec.hidden_size, model.dtype,
                                    model.device)
        vocab = engine.loaded.spec.vocab_size
        validate_token_ids(token_ids, vocab, engine.max_model_len)
        for t in (x for w in request.stop_words for x in w):
            if t >= vocab:
                raise InvalidRequestError(f"stop_words: token id {t} is out of range [0, {vocab})")
        if request.end_id is not None and request.end_id >= vocab:
            raise InvalidRequestError(f"end_id: {request.end_id} is out of range [0, {vocab})")
        params = request.sampling
        if request.n > 1 and params.n > 1 and request.n != params.n:
            raise InvalidRequestError(f"n: the request asks for {request.n}, its sampling params for {params.n}")
        n = max(request.n, params.n)
        if n != params.n:  # one n from here on; SamplingParams checks it against best_of / beam_width
            params = dataclasses.replace(params, n=n)
        if request.end_id is not None and request.end_id not in params.stop_token_ids:
            # min_tokens masks stop ids; the end id is checked first, so it still ends as END_ID.
            params = dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, request.end_id))
        if n != request.n or params is not request.sampling:
            request = dataclasses.replace(request, n=n, sampling=params)
        self._check_fanout(request, len(token_ids))
        engine.logits_processors.check(params.logits_processors)
        bad_words = check_token_ids(params, vocab, engine.tokenizer)  # stop ids, logit_bias, bad words
        if params.structured:
            engine.grammar_compiler()  # fails now, not in the loop, if the grammar engine cannot run
        stop = StopConditions.from_params(params, engine.eos_token_ids, max_tokens=request.effective_max_tokens,
                                          max_model_len=engine.max_model_len, end_id=request.end_id,
                                          stop_sequences=request.stop_words)
        now = time.monotonic()
        job = Job(request=request, prompt_token_ids=token_ids, timing=Timing(arrival=now),
                  deadline=None if request.allotted_time is None else now + request.allotted_time, collect=collect,
                  stop_conditions=stop)
        job.bad_words = bad_words
        job.lora = lora
        job.soft = soft
        if text is None and not request.exclude_input_from_output and engine.tokenizer is not None:
            text = engine.tokenizer.decode(token_ids, params.skip_special_tokens)
        job.prompt_text = text
        root = self.new_sequence(job, 0, token_ids)
        job.sequences.append(root)
        if params.beam_width > 1:
            ends = set(stop.end_ids | stop.stop_token_ids)
            limit = min(request.effective_max_tokens, engine.max_model_len - len(token_ids))
            job.beam = BeamGroup(root, beam_search_for(params, limit, ends))
        return job

    def _check_fanout(self, request: Request, num_prompt_tokens: int) -> None:
        """n, best_of and beam_width against the engine's limits and the request's other options."""
        params = request.sampling
        samples = params.num_samples
        name = "beam_width" if params.beam_width > 1 else ("best_of" if samples > params.n else "n")
        cfg = self.engine.config
        if samples > cfg.max_num_seqs:
            raise InvalidRequestError(f"{name}: {samples} sequences exceed max_num_seqs {cfg.max_num_seqs}")
        if params.beam_width > 1:
            if request.streaming:
                raise InvalidRequestError("streaming: beam search knows its best beams only at the end; "
                                          "use streaming=False")
            if request.stop_words:
                raise InvalidRequestError("stop_words: beam search ends beams on token ids only "
                                          "(stop_token_ids, end_id)")
            if samples > cfg.max_num_batched_tokens:
                raise InvalidRequestError(f"beam_width: {samples} beams must fit in one step's "
                                          f"max_num_batched_tokens {cfg.max_num_batched_tokens}")
        self._check_fits(request, num_prompt_tokens, name)
        if params.beam_width > 1:
            return
        if params.greedy and samples > 1:
            raise InvalidRequestError(f"{name}: greedy sampling (temperature 0) would give {samples} identical "
                                      "sequences")
        if samples > params.n and request.streaming:
            raise InvalidRequestError("streaming: best_of > n returns the most likely samples once all have "
                                      "ended, so there is nothing to stream; use streaming=False")

    def _check_fits(self, request: Request, num_prompt_tokens: int, name: str) -> None:
        """Every accepted request must be able to run with the cache to itself (else it would
        wait forever): beams and GUARANTEED_NO_EVICT samples all at full length, other requests
        one sequence. Pinned prefix blocks are not the cache's to give."""
        kv = self.engine.core.kv  # reads two ints only: this runs on the caller's thread
        params = request.sampling
        final = min(num_prompt_tokens + request.effective_max_tokens, self.engine.max_model_len)
        need = blocks_to_run_alone(num_prompt_tokens, final, params.num_samples, params.beam_width > 1,
                                   self.kv_policy, kv.block_size)
        pinned_blocks = kv.num_pinned_blocks
        usable = kv.num_blocks - pinned_blocks
        if need > usable:
            what = "the request"
            if params.num_samples > 1:
                what = f"{name}: {params.num_samples} {'beams' if params.beam_width > 1 else 'sequences'}"
            pinned = f" ({pinned_blocks} more are pinned)" if pinned_blocks else ""
            raise InvalidRequestError(f"{what} of up to {final} tokens may need {need} KV blocks at once; "
                                      f"the cache has {usable}{pinned}")

    def new_sequence(self, job: Job, index: int, token_ids: list[int]) -> ExecSequence:
        """Sequence ``index`` of ``job`` holding ``token_ids`` (no KV blocks yet)."""
        params = job.request.sampling
        seq = ExecSequence(next(self._seq_ids), list(job.prompt_token_ids), params, token_ids=list(token_ids),
                           job=job, index=index)
        seq.finisher = Finisher(job.stop_conditions, self.engine.tokenizer, num_prompt_tokens=seq.num_prompt_tokens)
        seq.request_id = str(job.request_id)
        seq.bad_words = list(job.bad_words)
        if job.lora is not None:
            seq.lora = job.lora
            seq.cache_salt = job.lora.cache_salt
        if job.soft is not None:  # soft positions are content of their own for the prefix cache
            seq.soft = job.soft
            seq.cache_salt = hash(("soft", seq.cache_salt, job.soft.content_hash))
        if params.structured:
            seq.grammar = self.engine.grammar_compiler().matcher(params)  # each sample parses its own output
        if params.seed is not None and params.beam_width == 1:
            # Sample i of a seeded request draws from seed + i (vLLM's rule): distinct, reproducible.
            seq.generator = torch.Generator(device=self.engine.core.device)
            seq.generator.manual_seed(params.seed + index)
        spec = self.speculator.config_for(params.speculative, beam=params.beam_width > 1)
        if spec is not None:
            seq.spec = self.speculator.new_state(spec)  # each sample proposes from its own output
        return seq

    def output_sequence(self, job: Job, index: int, output_token_ids: list[int], finish: FinishReason,
                        cumulative_logprob: float) -> ExecSequence:
        """A finished sequence holding a beam-search hypothesis, to be returned as output ``index``."""
        seq = self.new_sequence(job, index, job.prompt_token_ids + output_token_ids)
        assert seq.finisher is not None
        for token in output_token_ids:
            seq.finisher.add(token)
        seq.finish = finish
        seq.cumulative_logprob = cumulative_logprob
        seq.num_cached_tokens = job.root.num_cached_tokens
        return seq
