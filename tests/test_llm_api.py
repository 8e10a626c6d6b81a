"""LLM.generate: prompt forms, bad input errors (with no partial state), scheduling, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from choral import (
    LLM,
    ConfigError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    SamplingParams,
    TokenIdOutOfRangeError,
    UnsupportedArchitectureError,
)

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    return LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512, max_model_len=64)


def assert_pool_empty(llm: LLM) -> None:
    pool = llm.engine.pool
    assert pool.num_free_blocks == pool.num_blocks
    pool.check_invariants({})


def test_missing_model_file() -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model.gguf"):
        LLM("/nonexistent/no-such-model.gguf")


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError) as err:
        LLM(str(tmp_path))
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(err.value)


def test_pickle_weights_are_refused(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="pickle files are never loaded"):
        LLM(str(tmp_path))


def test_unknown_option_and_bad_values_are_errors(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    with pytest.raises(ConfigError, match="unknown LLM option\\(s\\) gpu_memory; known: .*gpu_memory_utilization"):
        LLM(str(directory), gpu_memory=0.5)
    with pytest.raises(ConfigError, match="dtype"):
        LLM(str(directory), dtype="float8")
    with pytest.raises(ConfigError, match="block_size"):
        LLM(str(directory), block_size=0)
    with pytest.raises(ConfigError, match="max_model_len"):
        LLM(str(directory), max_model_len=10_000)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
     ({"top_k": -5}, "top_k"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
     ({"logprobs": 99}, "logprobs"), ({"stop": [""]}, "stop"), ({"seed": -1}, "seed")],
)
def test_sampling_params_name_the_bad_field(kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_no_state(tiny_llm: LLM) -> None:
    with pytest.raises(TokenIdOutOfRangeError, match="token id 999"):
        tiny_llm.generate([[5, 6, 7], [1, 999]], GREEDY)
    with pytest.raises(TokenIdOutOfRangeError, match="-1"):
        tiny_llm.generate([3, -1], GREEDY)
    with pytest.raises(PromptTooLongError, match="64"):
        tiny_llm.generate(list(range(3, 67)), GREEDY)
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        tiny_llm.generate("hello", GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_llm.generate([[]], GREEDY)
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        tiny_llm.generate([[5], [6]], [GREEDY])
    assert_pool_empty(tiny_llm)
    # The engine still works after every rejection.
    out = tiny_llm.generate([5, 6, 7], GREEDY)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 8


def test_single_and_batched_prompts_agree(tiny_llm: LLM) -> None:
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 13]
    alone = [tiny_llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, GREEDY)]
    assert alone == together
    assert_pool_empty(tiny_llm)


def test_generation_stops_at_the_context_limit(tiny_llm: LLM) -> None:
    out = tiny_llm.generate(list(range(3, 60)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 64 - 57
    assert out.outputs[0].finish_reason == "length"


def test_stop_token_ids_and_min_tokens(tiny_llm: LLM) -> None:
    free = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    first = free.outputs[0].token_ids[0]
    stopped = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first]))[0]
    assert stopped.outputs[0].token_ids == [first] and stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == first
    held = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, min_tokens=3,
                                                       stop_token_ids=[first]))[0]
    assert first not in held.outputs[0].token_ids[:3]


def test_seeded_sampling_is_independent_of_the_batch(tiny_llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_k=20, max_tokens=10, seed=42, ignore_eos=True)
    alone = tiny_llm.generate([5, 6, 7], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=10, ignore_eos=True)
    mixed = tiny_llm.generate([[9, 9], [5, 6, 7], [11, 12, 13, 14]], [others, seeded, others])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=1.0, top_k=20, max_tokens=10,
                                                             seed=43, ignore_eos=True))[0]
    assert other_seed.outputs[0].token_ids != alone


def test_logprobs_are_returned(tiny_llm: LLM) -> None:
    out = tiny_llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert lps is not None and len(lps) == 4
    for token, entry in zip(out.outputs[0].token_ids, lps, strict=True):
        # Greedy: the chosen token is the most likely, so it heads the top 3 (vLLM's dict form).
        assert len(entry) == 3 and next(iter(entry)) == token and entry[token].rank == 1
        assert [e.rank for e in entry.values()] == [1, 2, 3]
        values = [e.logprob for e in entry.values()]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_tiny_pool_preempts_and_still_matches(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    big = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=64)
    small = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=64, max_model_len=64,
                max_num_batched_tokens=32)
    prompts = [list(range(3 + i, 20 + i)) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in big.generate(prompts, params)]
    outs = small.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert sum(o.metrics.num_preemptions for o in outs if o.metrics is not None) > 0
    assert_pool_empty(small)


def test_kv_cache_smaller_than_context_is_refused(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    with pytest.raises(ConfigError, match="kv_cache_tokens"):
        LLM(str(directory), dtype="float32", kv_cache_tokens=32, max_model_len=64)
