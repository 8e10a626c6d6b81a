"""Structured output (llguidance) and stop strings on the bundled SmolLM2."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from choral import LLM, InvalidRequestError, SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima", "Oslo"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_twenty_json_schema_requests_parse_and_validate(smollm_fp32: LLM) -> None:
    prompts = [chat(f"Describe person number {i} as JSON with name, age, city and tags.") for i in range(20)]
    params = [SamplingParams(temperature=0.8 if i % 2 else 0.0, seed=i, max_tokens=120, json_schema=PERSON)
              for i in range(20)]
    outs = smollm_fp32.generate(prompts, params)
    assert len(outs) == 20
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_regex_and_gbnf_grammar(smollm_fp32: LLM) -> None:
    regex = r"[0-9]{3}-[a-z]{2,5}"
    out = smollm_fp32.generate(chat("Give me a code."), SamplingParams(temperature=0, max_tokens=20, regex=regex))
    assert re.fullmatch(regex, out[0].outputs[0].text)
    grammar = 'root ::= answer "."\nanswer ::= "yes" | "no"'
    outs = smollm_fp32.generate([chat("Is the sky blue?"), chat("Is fire cold?")],
                                SamplingParams(temperature=0.7, seed=3, max_tokens=10, grammar=grammar))
    for out in outs:
        assert out.outputs[0].text in ("yes.", "no.")


def test_constrained_and_free_rows_in_one_batch(smollm_fp32: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=12)
    alone = smollm_fp32.generate(chat("Name a colour."), free)[0].outputs[0].token_ids
    mixed = smollm_fp32.generate([chat("Name a colour."), chat("Pick a number.")],
                                 [free, SamplingParams(temperature=0, max_tokens=12, regex=r"[1-9]")])
    assert mixed[0].outputs[0].token_ids == alone
    assert re.fullmatch(r"[1-9]", mixed[1].outputs[0].text)


def test_bad_grammar_is_a_request_error(smollm_fp32: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="grammar"):
        smollm_fp32.generate("x", SamplingParams(grammar="root ::= ( unclosed"))
    with pytest.raises(InvalidRequestError, match="regex"):
        smollm_fp32.generate("x", SamplingParams(regex="(["))


def test_stop_string_spanning_several_tokens(smollm_fp32: LLM) -> None:
    tok = smollm_fp32.tokenizer
    assert tok is not None
    prompt = chat("Write two sentences about the sea.")
    free = smollm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    # A stop string made of the end of one token and the start of the next few.
    pieces = [tok.decode([t]) for t in free.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = free.text[start : start + len(pieces[2]) + len(pieces[3]) + 2]
    assert len(stop) >= 3 and free.text.count(stop) >= 1
    out = smollm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0].outputs[0]
    assert out.text == free.text[: free.text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(free.token_ids)


def test_bad_words_as_text(smollm_fp32: LLM) -> None:
    prompt = chat("What is the capital of France?")
    free = smollm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].text
    assert "Paris" in free
    out = smollm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=20, bad_words=["Paris"]))
    assert "Paris" not in out[0].outputs[0].text
