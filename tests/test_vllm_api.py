"""The vLLM-shaped surface of LLM: constructor options (honoured or refused), get_tokenizer, prompt
dicts, Logprob dicts with ranks, structured_outputs / guided_decoding, include_stop_str_in_output,
allowed_token_ids, truncate_prompt_tokens, stop_reason, num_cached_tokens and metrics."""

from __future__ import annotations

import json
import logging
import time

import pytest

from choral import (
    LLM,
    ConfigError,
    GuidedDecodingParams,
    InvalidRequestError,
    Logprob,
    SamplingParams,
    StructuredOutputsParams,
    TokenIdOutOfRangeError,
)

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_models):  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    return LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512, max_model_len=64,
               enforce_eager=True, trust_remote_code=True, tensor_parallel_size=1, seed=7)


def _pool_empty(llm: LLM) -> None:
    pool = llm.engine.pool
    assert pool.num_free_blocks == pool.num_blocks


# ---- constructor options -------------------------------------------------------------------------
def test_vllm_options_are_honoured(tiny, tiny_models) -> None:  # type: ignore[no-untyped-def]
    assert tiny.config.seed == 7 and tiny.config.max_model_len == 64
    directory, _ = tiny_models["llama"]
    half = LLM(str(directory), dtype="float", block_size=4, kv_cache_tokens=128, max_model_len=32)
    assert half.config.dtype == "float32"
    import torch

    assert LLM(str(directory), dtype=torch.float32, kv_cache_tokens=128, max_model_len=32).config.dtype == "float32"


def test_weights_and_quantization_reach_the_loader(tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """LLM(weights=..., quantization=...) must reach load_model, not fall back to its defaults."""
    import choral.loader.load as load

    seen: dict[str, object] = {}
    real = load.load_model

    def recording(model, dtype, device, max_model_len, weights="auto", quantization=None):  # type: ignore[no-untyped-def]
        seen.update(weights=weights, quantization=quantization)
        return real(model, dtype, device, max_model_len, weights, quantization)

    monkeypatch.setattr(load, "load_model", recording)
    directory, _ = tiny_models["llama"]
    LLM(str(directory), dtype="float32", kv_cache_tokens=128, max_model_len=32, weights="dequantize")
    assert seen == {"weights": "dequantize", "quantization": None}
    LLM(str(directory), dtype="float32", kv_cache_tokens=128, max_model_len=32, quantization="q8_0")
    assert seen == {"weights": "auto", "quantization": "q8_0"}


def test_gpu_memory_utilization_on_cpu_warns(tiny_models, caplog) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(directory), dtype="float32", max_model_len=32, gpu_memory_utilization=0.5)
    assert "gpu_memory_utilization=0.5 applies to GPU memory" in caplog.text
    assert llm.generate([5, 6], GREEDY)[0].outputs[0].token_ids


@pytest.mark.parametrize(("options", "message"), [
    ({"tensor_parallel_size": 2, "quantization": "q8_0"}, "tensor_parallel_size=2: quantized weights kept packed"),
    ({"tensor_parallel_size": 8}, "tensor_parallel_size: 8 ranks for 4 attention heads"),
    ({"pipeline_parallel_size": 4}, "pipeline_parallel_size=4: pipeline parallelism is not supported"),
    ({"quantization": "awq"}, "quantization: 'awq'|quantization='awq'"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype: 'fp8' is not supported"),
    ({"revision": "main"}, "revision: choral never downloads"),
    ({"tokenizer_mode": "mistral"}, "tokenizer_mode: 'mistral'"),
    ({"enable_chunked_prefill": False}, "enable_chunked_prefill=False"),
    ({"load_format": "gguf"}, "load_format='gguf' does not match"),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization: must be a number in \(0, 1\]"),
    ({"gpu_memory_utilization": 0.5, "kv_cache_tokens": 64}, "not both"),
    ({"dtype": "float8"}, "dtype: 'float8' is not one of"),
    ({"swap_space": 4}, "unknown LLM option.*swap_space; known: .*gpu_memory_utilization"),
    ({"skip_tokenizer_init": True, "tokenizer": "x"}, "cannot be combined"),
])
def test_vllm_options_we_cannot_honour_are_refused(tiny_models, options, message) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    with pytest.raises(ConfigError, match=message):
        LLM(str(directory), **{"dtype": "float32", **options})


def test_skip_tokenizer_init(smollm_path) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_tokens=256, max_model_len=128, skip_tokenizer_init=True)
    assert llm.tokenizer is None
    with pytest.raises(ConfigError, match="no tokenizer"):
        llm.get_tokenizer()
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        llm.generate("text needs a tokenizer")
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].text == ""


def test_tokenizer_option_loads_another_tokenizer(tiny_models, smollm_path) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    with pytest.raises(ConfigError, match="49152 tokens, more than the model's 128"):
        LLM(str(directory), dtype="float32", max_model_len=32, tokenizer=str(smollm_path))
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_tokens=256, max_model_len=128, tokenizer=str(smollm_path))
    assert llm.generate("Hi", GREEDY)[0].outputs[0].text


def test_get_tokenizer_is_the_transformers_tokenizer(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    tok = smollm_fp32.get_tokenizer()
    ids = tok.encode("Hello world")
    assert ids == smollm_fp32.tokenizer.encode("Hello world") and tok.decode(ids) == "Hello world"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


# ---- prompts ------------------------------------------------------------------------------------------
def test_prompt_dicts(tiny) -> None:  # type: ignore[no-untyped-def]
    ids = [5, 6, 7, 8]
    plain = tiny.generate(ids, GREEDY)[0]
    as_dict = tiny.generate({"prompt_token_ids": ids}, GREEDY)[0]
    assert as_dict.prompt_token_ids == ids and as_dict.outputs[0].token_ids == plain.outputs[0].token_ids
    batch = tiny.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": [9, 10]}, ids], GREEDY)
    assert [o.prompt_token_ids for o in batch] == [ids, [9, 10], ids]
    assert batch[0].outputs[0].token_ids == batch[2].outputs[0].token_ids == plain.outputs[0].token_ids


@pytest.mark.parametrize(("prompt", "message"), [
    ({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": object()}}, "multi_modal_data: multi-modal"),
    ({"prompt_token_ids": "1 2"}, "prompt_token_ids: must be a list of token ids"),
    ({"prompt_token_ids": [1], "extra": 1}, "unknown key.*extra"),
    ({"prompt": 5}, "must be a str.*token ids go in 'prompt_token_ids'"),
    ({"prompt_token_ids": [1, 2], "prompt_embeds": [0.1]}, "prompt_embeds"),
])
def test_bad_prompt_dicts_are_refused(tiny, prompt, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match=message):
        tiny.generate([[5, 6], prompt], GREEDY)
    _pool_empty(tiny)


def test_text_prompt_dict(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    text = smollm_fp32.generate("The capital of France is", GREEDY)[0]
    as_dict = smollm_fp32.generate({"prompt": "The capital of France is"}, GREEDY)[0]
    assert as_dict.prompt == "The capital of France is"
    assert as_dict.outputs[0].token_ids == text.outputs[0].token_ids
    chat = smollm_fp32.chat([{"role": "user", "content": "Hi"}], GREEDY)[0]
    assert chat.prompt is not None and chat.prompt.endswith("<|im_start|>assistant\n")


def test_truncate_prompt_tokens(tiny) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(3, 40))
    cut = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                               truncate_prompt_tokens=5))[0]
    tail = tiny.generate(prompt[-5:], GREEDY)[0]
    assert cut.prompt_token_ids == prompt[-5:] and cut.outputs[0].token_ids == tail.outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens: 0 is outside"):
        SamplingParams(truncate_prompt_tokens=0)


def test_priority_and_lora_arguments(tiny) -> None:  # type: ignore[no-untyped-def]
    outs = tiny.generate([[5, 6], [7, 8]], GREEDY, priority=[1, 0])
    assert [o.prompt_token_ids for o in outs] == [[5, 6], [7, 8]]
    with pytest.raises(InvalidRequestError, match="priority: give one int per prompt"):
        tiny.generate([[5, 6], [7, 8]], GREEDY, priority=[1])
    with pytest.raises(InvalidRequestError, match="lora_request"):
        tiny.generate([5, 6], GREEDY, lora_request=object())


# ---- outputs ------------------------------------------------------------------------------------------
def test_logprob_dicts_with_ranks(tiny) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=1.5, max_tokens=12, logprobs=2, prompt_logprobs=1, seed=3, ignore_eos=True)
    out = tiny.generate(list(range(3, 20)), params)[0]
    sample = out.outputs[0]
    assert sample.logprobs is not None and len(sample.logprobs) == 12
    outside = 0
    for token, entry in zip(sample.token_ids, sample.logprobs, strict=True):
        assert next(iter(entry)) == token and all(isinstance(e, Logprob) for e in entry.values())
        tops = [t for t in entry if t != token or entry[t].rank in (1, 2)]
        ranked = sorted(entry[t].rank for t in tops)
        assert ranked[:2] == [1, 2]
        chosen = entry[token]
        if chosen.rank is not None and chosen.rank > 2:  # sampled outside the top 2: three entries
            outside += 1
            assert len(entry) == 3 and chosen.logprob <= min(entry[t].logprob for t in entry if t != token)
        assert chosen.decoded_token is None  # the tiny model has no tokenizer
    assert outside > 0  # temperature 1.5 on a random model leaves the top 2 now and then
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == 17
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
        assert entry is not None and token in entry and entry[token].rank >= 1
        assert min(e.rank for e in entry.values()) == 1


def test_metrics_and_cached_tokens(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    llm = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512, max_model_len=64,
              enable_prefix_caching=True)
    prompt = list(range(3, 23))
    before = time.time()
    first = llm.generate(prompt, GREEDY)[0]
    second = llm.generate(prompt, GREEDY)[0]
    after = time.time()
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 16  # 4 full blocks of 4, 20 tokens
    m = second.metrics
    assert m is not None and m.first_token_time is not None and m.finished_time is not None
    assert before - 1 <= m.arrival_time <= m.first_token_time <= m.finished_time <= after + 1
    assert m.time_in_queue is not None and m.time_in_queue >= 0 and m.num_preemptions == 0


def test_stop_reason_is_none_for_eos(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    out = smollm_fp32.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64))
    sample = out[0].outputs[0]
    assert sample.finish_reason == "stop" and sample.token_ids[-1] == 2 and sample.stop_reason is None
    stopped = smollm_fp32.chat([{"role": "user", "content": "Say hi."}],
                               SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[sample.token_ids[1]]))
    assert stopped[0].outputs[0].stop_reason == sample.token_ids[1]


def test_include_stop_str_in_output(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    free = smollm_fp32.generate("The capital of France is", GREEDY)[0].outputs[0].text
    stop = free.strip().split()[1]
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=6, stop=[stop], include_stop_str_in_output=include)
        out = smollm_fp32.generate("The capital of France is", params)[0].outputs[0]
        assert out.stop_reason == stop and out.finish_reason == "stop"
        cut = free.index(stop)
        assert out.text == (free[:cut + len(stop)] if include else free[:cut])
    streamed = smollm_fp32.executor.submit(__import__("choral.executor", fromlist=["Request"]).Request(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=6, stop=[stop],
                                                   include_stop_str_in_output=True)))
    assert streamed.text.endswith(stop)


def test_allowed_token_ids(tiny) -> None:  # type: ignore[no-untyped-def]
    allowed = [11, 17, 40]
    out = tiny.generate([5, 6, 7], SamplingParams(temperature=1.0, max_tokens=20, seed=1, ignore_eos=True,
                                                  allowed_token_ids=allowed))[0]
    assert set(out.outputs[0].token_ids) <= set(allowed) and len(out.outputs[0].token_ids) == 20
    with pytest.raises(TokenIdOutOfRangeError.__mro__[1], match="allowed_token_ids: token id 500 is out of range"):
        tiny.generate([5, 6], SamplingParams(allowed_token_ids=[500]))
    with pytest.raises(InvalidRequestError, match="allowed_token_ids: must name at least one"):
        SamplingParams(allowed_token_ids=[])
    _pool_empty(tiny)


# ---- structured outputs -------------------------------------------------------------------------------
def test_guided_choice_regex_json(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    choice = SamplingParams(temperature=0, max_tokens=10,
                            guided_decoding=GuidedDecodingParams(choice=["Positive", "Negative"]))
    assert choice.grammar is not None and choice.guided_decoding is not None
    text = smollm_fp32.generate("Classify: I love it!", choice)[0].outputs[0].text
    assert text in ("Positive", "Negative")
    regex = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"regex": "[a-z]{1,8}@[a-z]{1,8}\\.com"})
    assert regex.regex == "[a-z]{1,8}@[a-z]{1,8}\\.com"
    email = smollm_fp32.generate("Email of Alan Turing:", regex)[0].outputs[0].text
    import re

    assert re.fullmatch("[a-z]{1,8}@[a-z]{1,8}\\.com", email)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    js = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(json=schema))
    value = json.loads(smollm_fp32.generate("Give an age as JSON:", js)[0].outputs[0].text)
    assert isinstance(value["age"], int) and list(value) == ["age"]
    obj = SamplingParams(temperature=0, max_tokens=20, guided_decoding=GuidedDecodingParams(json_object=True))
    assert isinstance(json.loads(smollm_fp32.generate("A JSON object:", obj)[0].outputs[0].text), dict)


@pytest.mark.parametrize(("options", "message"), [
    ({"guided_decoding": GuidedDecodingParams()}, "set exactly one of.*got none"),
    ({"guided_decoding": GuidedDecodingParams(regex="a", choice=["b"])}, "got regex, choice"),
    ({"guided_decoding": {"choice": []}}, "choice: must be a non-empty list"),
    ({"guided_decoding": {"regex": "a"}, "json_schema": "{}"}, "guided_decoding: cannot be combined with json_schema"),
    ({"structured_outputs": {"regex": "a"}, "guided_decoding": {"regex": "b"}}, "cannot be combined"),
    ({"structured_outputs": {"json": {}, "backend": "xgrammar"}}, "backend: 'xgrammar' is not available"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "whitespace_pattern: not supported"),
    ({"structured_outputs": {"regex": "a", "nope": 1}}, "unknown field.*nope"),
    ({"structured_outputs": "json"}, "must be a StructuredOutputsParams or a dict"),
    ({"guided_decoding": {"choice": ["a"]}, "beam_width": 2}, "beam search does not combine"),
])
def test_bad_structured_outputs(options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**options)


def test_conversation_sample_refuses_truncate_prompt_tokens(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from choral import BatchedExecutor

    directory, _ = tiny_models["llama"]
    with BatchedExecutor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=64, max_model_len=32) as ex:
        conv = ex.create()
        conv.prompt([5, 6, 7])
        ex.infer()
        with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens: a conversation"):
            conv.sample(SamplingParams(truncate_prompt_tokens=2))
        assert conv.sample(SamplingParams(temperature=0)) >= 0
