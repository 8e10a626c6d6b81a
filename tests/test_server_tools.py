"""Tool calling, a lenient request surface and assistant prefill, through the official openai client
against a real server on the bundled SmolLM2 (whose ChatML template ignores tools: the server
describes them in a system text and constrains forced calls to the functions' schemas)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from test_server import start_server

WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                                                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "enum": ["Paris", "London"]}},
                                               "required": ["city"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, base = start_server()
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def schema_of(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)  # type: ignore[index]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_round_trip(client: Any, choice: Any) -> None:
    """call -> tool result -> answer; the forced call parses and matches its function's schema."""
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=60)
    c = first.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None and c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        if not isinstance(choice, str):
            assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))
    call = c.message.tool_calls[0]
    history = [*ASK, c.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    assert history[1]["role"] == "assistant" and "content" not in history[1]  # null content, tool_calls only
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=12)
    a = answer.choices[0]
    assert a.finish_reason in ("stop", "length") and a.message.tool_calls is None
    assert isinstance(a.message.content, str) and a.message.content.strip()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_calls_reassemble_to_the_same_calls(client: Any, choice: Any) -> None:
    from openai.lib.streaming.chat import ChatCompletionStreamState

    args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**args).choices[0]
    state = ChatCompletionStreamState()
    pieces = 0
    for chunk in client.chat.completions.create(**args, stream=True):
        state.handle_chunk(chunk)
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if d.id is not None:  # the first delta of a call: id, type and name, no arguments yet
                assert d.type == "function" and d.function.name and d.function.arguments == ""
            else:
                pieces += 1
    streamed = state.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    assert [(t.function.name, t.function.arguments) for t in streamed.message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert pieces > 1  # the arguments came in pieces as they were generated


def test_parallel_tool_calls_false_is_one_call(client: Any) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=60)
    assert len(r.choices[0].message.tool_calls) == 1


def test_agent_style_request_with_unknown_fields_is_served(client: Any) -> None:
    extra = {"store": False, "metadata": {"run": "7"}, "reasoning_effort": "low", "service_tier": "auto",
             "cache_prompt": True, "prompt_cache_key": "k", "safety_identifier": "u1", "modalities": ["text"],
             "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *ASK], tools=TOOLS, tool_choice="auto",
        parallel_tool_calls=True, temperature=0, max_tokens=4, stream=True, extra_body=extra)
    ignored = raw.headers["x-choral-ignored-fields"].split(", ")
    assert sorted(ignored) == sorted(["store", "metadata", "reasoning_effort", "service_tier", "cache_prompt",
                                      "prompt_cache_key", "safety_identifier", "modalities",
                                      "stream_options.continuous_usage_stats"])
    chunks = list(raw.parse())
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize(("body", "needle"), [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                               {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[1]: image_url parts are not supported"),
    ({"messages": ASK, "audio": {"voice": "alloy", "format": "wav"}}, "audio: audio output is not supported"),
    ({"messages": ASK, "modalities": ["text", "audio"]}, "only the text modality"),
    ({"messages": ASK, "functions": [{"name": "f"}]}, "legacy functions API"),
    ({"messages": ASK, "tool_choice": "required"}, "no tools"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "no tool is named 'nope'"),
    ({"messages": ASK, "tools": [{"type": "web_search"}]}, "tools"),
    ({"messages": ASK, "chat_template_kwargs": {"tools": []}}, "'tools' is set by the server"),
    ({"messages": ASK, "continue_final_message": True}, "the last message must be an assistant message"),
])
def test_what_cannot_be_honoured_is_a_400(server: str, body: dict[str, Any], needle: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_assistant_prefill_continues_the_last_message(server: str, client: Any) -> None:
    messages = [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                       extra_body={"echo": True})
    continued = r.choices[0].message.content
    assert continued.startswith("Red, green")
    # The same as completing the rendered prompt without the end of the assistant's turn.
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\nRed, green")
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6)
    assert continued == "Red, green" + plain.choices[0].text
    # add_generation_prompt=False without continuing: a new turn is not opened, nothing is continued.
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                       extra_body={"continue_final_message": False, "add_generation_prompt": True})
    assert not r.choices[0].message.content.startswith("Red, green")


def test_models_and_health(server: str) -> None:
    for path in ("/health", "/v1/health"):
        r = httpx.get(server + path)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    card = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert card["max_model_len"] == 2048
    meta = card["meta"]
    assert meta["vocab_size"] == 49152 and meta["architecture"] and meta["num_parameters"] > 100_000_000
    assert meta["tool_call_parser"] == "hermes" and meta["chat_template"] is True


# Every name docs/server.md lists, with its type (as prometheus_client's parser reports it: a
# counter's family name is without ``_total``).
DOCUMENTED = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "choral_num_requests_running": "gauge", "choral_num_requests_waiting": "gauge",
    "choral_kv_cache_usage_perc": "gauge", "choral_kv_cache_used_blocks": "gauge",
    "choral_prefix_cache_queries": "counter", "choral_prefix_cache_hits": "counter",
    "choral_num_preemptions": "counter", "choral_prompt_tokens": "counter", "choral_generation_tokens": "counter",
    "choral_request_success": "counter", "choral_time_to_first_token_seconds": "histogram",
    "choral_e2e_request_latency_seconds": "histogram", "choral_time_per_output_token_seconds": "histogram",
}


def scrape(server: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` (a counter's ``_total``, a histogram's ``_count``)."""
    return sum(s.value for family in families.values() for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_have_vllms_names_and_count_a_cancel(server: str, client: Any) -> None:
    import time

    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0)
    before = scrape(server)
    for name, kind in DOCUMENTED.items():
        assert name in before, name
        assert before[name].type == kind, (name, before[name].type)
    for family in before.values():
        for s in family.samples:
            assert s.labels.get("model_name") == MODEL, s
    aborts = sample(before, "vllm:request_success_total", finished_reason="abort")
    stops = sample(before, "vllm:request_success_total", finished_reason="stop") + \
        sample(before, "vllm:request_success_total", finished_reason="length")
    assert stops >= 1 and sample(before, "vllm:generation_tokens_total") >= 3
    assert sample(before, "vllm:time_to_first_token_seconds_count") >= 1
    # A streaming client that goes away after the first chunk: its request is aborted and counted.
    with httpx.stream("POST", f"{server}/v1/chat/completions",
                      json={"messages": ASK, "max_tokens": 500, "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 60
    while sample(scrape(server), "vllm:request_success_total", finished_reason="abort") < aborts + 1:
        assert time.monotonic() < deadline, "the cancelled request was not counted"
        time.sleep(0.1)
    after = scrape(server)
    assert sample(after, "choral_request_success_total", finished_reason="cancelled") >= 1
    assert sample(after, "vllm:num_requests_running") == 0


def test_embeddings_through_the_openai_client(client: Any) -> None:
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten rested on the rug."]
    batched = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    vectors = [d.embedding for d in batched.data]
    assert [len(v) for v in vectors] == [576] * 3 and batched.usage.prompt_tokens > 10
    for v, f in zip(vectors, floats.data, strict=True):
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-5)
        assert v == pytest.approx(f.embedding, abs=1e-6)
    single = client.embeddings.create(model=MODEL, input=texts[2], encoding_format="float").data[0].embedding
    assert single == pytest.approx(vectors[2], abs=1e-5)
