"""Decoding controls through LLM.generate: min_tokens, stop strings, bad words, logit bias,
logits processors, n / best_of on shared KV, beam search equal to transformers'."""

from __future__ import annotations

import math

import pytest
import torch

from choral import LLM, InvalidRequestError, SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10, 11]  # 7 tokens: the last KV block (size 4) is partly filled and shared


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    return LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=64)


def greedy(llm: LLM, **kwargs) -> list[int]:  # type: ignore[no-untyped-def]
    params = SamplingParams(**{"temperature": 0, "max_tokens": 8, "ignore_eos": True, **kwargs})
    return llm.generate(PROMPT, params)[0].outputs[0].token_ids


def assert_pool_empty(llm: LLM) -> None:
    pool = llm.engine.pool
    assert pool.num_free_blocks == pool.num_blocks
    pool.check_invariants({})


def test_min_tokens_masks_eos_until_reached(tiny_llm: LLM) -> None:
    eos = tiny_llm.engine.eos_token_ids[0]
    eager = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0})
    assert tiny_llm.generate(PROMPT, eager)[0].outputs[0].token_ids == [eos]
    held = tiny_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, min_tokens=3,
                                                    logit_bias={eos: 100.0}))[0].outputs[0]
    assert len(held.token_ids) == 4 and eos not in held.token_ids[:3] and held.token_ids[3] == eos
    assert held.finish_reason == "stop"


def test_logit_bias_forces_and_bans(tiny_llm: LLM) -> None:
    assert greedy(tiny_llm, logit_bias={9: 100.0}) == [9] * 8
    free = greedy(tiny_llm)
    banned = greedy(tiny_llm, logit_bias={free[0]: -math.inf})
    assert banned[0] != free[0]


def test_bad_words_are_never_completed(tiny_llm: LLM) -> None:
    free = greedy(tiny_llm, max_tokens=12)
    pair = (free[1], free[2])
    out = greedy(tiny_llm, max_tokens=12, bad_words=[list(pair)])
    history = PROMPT + out
    assert all((a, b) != pair for a, b in zip(history, history[1:], strict=False))
    assert out[:2] == free[:2]  # nothing changes before the bad word would complete
    single = greedy(tiny_llm, max_tokens=12, bad_words=[[free[0]]])
    assert free[0] not in single


def test_penalties_change_greedy_output(tiny_llm: LLM) -> None:
    free = greedy(tiny_llm, max_tokens=16)
    no_repeat = greedy(tiny_llm, max_tokens=16, no_repeat_ngram_size=2)
    history = PROMPT + no_repeat
    bigrams = list(zip(history, history[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))
    assert greedy(tiny_llm, max_tokens=16, repetition_penalty=5.0) != free or len(set(free)) == len(free)


def test_logits_processors_by_name(tiny_llm: LLM) -> None:
    calls: list[tuple[str, int]] = []

    def force_nine(request_id: str, logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        calls.append((request_id, len(token_ids)))
        logits[:] = -math.inf
        logits[9] = 0.0
        return logits

    tiny_llm.register_logits_processor("force_nine", force_nine)
    tiny_llm.register_logits_processor("batched_force_nine", lambda ids, logits, toks: torch.where(
        torch.arange(logits.shape[-1]) == 9, 0.0, -math.inf).expand_as(logits), batched=True)
    assert greedy(tiny_llm, max_tokens=3, logits_processors=["force_nine"]) == [9, 9, 9]
    assert [n for _, n in calls] == [7, 8, 9]  # token_ids = prompt + output so far
    assert greedy(tiny_llm, max_tokens=3, logits_processors=["batched_force_nine"]) == [9, 9, 9]
    with pytest.raises(InvalidRequestError, match="unknown processor 'nope'"):
        greedy(tiny_llm, logits_processors=["nope"])


def count_prompt_tokens(llm: LLM) -> list[int]:
    """Patch the runner to record how many tokens each forward computes."""
    runner = llm.engine.runner
    seen: list[int] = []
    original = runner.execute

    def execute(chunks):  # type: ignore[no-untyped-def]
        seen.append(sum(len(c.token_ids) for c in chunks))
        return original(chunks)

    runner.execute = execute  # type: ignore[method-assign]
    return seen


def test_n_samples_share_the_prompt_and_match_seeded_singles(tiny_llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=6, ignore_eos=True)
    seen = count_prompt_tokens(tiny_llm)
    try:
        out = tiny_llm.generate(PROMPT, params)[0]
    finally:
        del tiny_llm.engine.runner.execute
    assert seen[0] == len(PROMPT) and all(n <= 3 for n in seen[1:])  # the prompt is computed once
    samples = [o.token_ids for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2] and len(set(map(tuple, samples))) == 3
    # Sample i draws from seed + i: equal to a single request with that seed (checks the forked,
    # copied-on-write KV too).
    for i, tokens in enumerate(samples):
        single = SamplingParams(temperature=1.0, seed=5 + i, max_tokens=6, ignore_eos=True)
        assert tiny_llm.generate(PROMPT, single)[0].outputs[0].token_ids == tokens
    assert_pool_empty(tiny_llm)


def test_best_of_returns_the_most_likely(tiny_llm: LLM) -> None:
    every = tiny_llm.generate(PROMPT, SamplingParams(temperature=1.0, n=4, seed=1, max_tokens=5, ignore_eos=True,
                                                     logprobs=0))[0].outputs
    best = tiny_llm.generate(PROMPT, SamplingParams(temperature=1.0, n=2, best_of=4, seed=1, max_tokens=5,
                                                    ignore_eos=True))[0].outputs
    ranked = sorted(every, key=lambda o: -(o.cumulative_logprob or 0.0))[:2]
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked]
    assert best[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob, abs=1e-5)
    assert_pool_empty(tiny_llm)


def test_n_in_a_mixed_batch_with_a_small_pool(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    small = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=96, max_model_len=64)
    params = [SamplingParams(temperature=1.0, n=3, seed=s, max_tokens=12, ignore_eos=True) for s in (1, 2)]
    params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    prompts = [PROMPT, [3, 4, 5, 6, 7], list(range(20, 33))]
    outs = small.generate(prompts, params)
    big = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=2048, max_model_len=64)
    ref = big.generate(prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in outs] == [[o.token_ids for o in r.outputs] for r in ref]
    assert_pool_empty(small)


# ``end`` is a token this random model does produce (found by running it), so that some beams
# finish on the end token and others on the length limit.
@pytest.mark.parametrize(("width", "length_penalty", "early_stopping", "end"),
                         [(2, 1.0, False, 24), (3, 1.0, False, 1), (4, 0.5, True, 1), (3, 2.0, False, 24),
                          (4, 1.0, False, 24)])
def test_beam_search_equals_transformers(tiny_models, width: int, length_penalty: float,  # type: ignore[no-untyped-def]
                                         early_stopping: bool, end: int) -> None:
    directory, hf_model = tiny_models["llama"]
    llm = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=64)
    max_tokens = 10
    params = SamplingParams(beam_width=width, n=width, max_tokens=max_tokens, length_penalty=length_penalty,
                            early_stopping=early_stopping, stop_token_ids=[end], ignore_eos=True)
    ours = llm.generate(PROMPT, params)[0].outputs
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([PROMPT]), num_beams=width, num_return_sequences=width,
                                max_new_tokens=max_tokens, do_sample=False, length_penalty=length_penalty,
                                early_stopping=early_stopping, eos_token_id=end, pad_token_id=0,
                                output_scores=True, return_dict_in_generate=True, top_k=None, top_p=None,
                                temperature=None)
    for i, out in enumerate(ours):
        length = int((ref.beam_indices[i] >= 0).sum())
        assert out.token_ids == ref.sequences[i, len(PROMPT) : len(PROMPT) + length].tolist()
        assert out.cumulative_logprob == pytest.approx(float(ref.sequences_scores[i]), abs=1e-4)
    assert "stop" in {o.finish_reason for o in ours}  # some beam finished on the end token
    assert_pool_empty(llm)


def test_beam_search_survives_preemption(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    # The beam request comes last: the newest request is preempted first, and a preempted beam
    # request restarts from its prompt (deterministic, so the result must not change).
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=24, ignore_eos=True),
              SamplingParams(beam_width=3, n=3, max_tokens=16, ignore_eos=True)]
    prompts = [list(range(20, 35)), [3, 4, 5], PROMPT]
    big = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=2048, max_model_len=64)
    ref = big.generate(prompts, params)
    small = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=64, max_model_len=64)
    preempted: list[bool] = []
    scheduler = small.executor.scheduler
    preempt = scheduler._preempt

    def counting_preempt(seq, step):  # type: ignore[no-untyped-def]
        preempted.append(seq.job.beam is not None)
        preempt(seq, step)

    scheduler._preempt = counting_preempt  # type: ignore[method-assign]
    outs = small.generate(prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in outs] == [[o.token_ids for o in r.outputs] for r in ref]
    assert any(preempted)  # the beam request was preempted (and restarted)
    assert_pool_empty(small)
