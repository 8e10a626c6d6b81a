"""Prompt tuning and prompt embeddings: a soft prompt equal to the embeddings of real tokens gives
the same logits as those tokens (placeholders, prepended, prompt_embeds), it keys the prefix
cache on its content, and bad tables are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from choral import LLM, SamplingParams, SoftPrompt
from choral.errors import InvalidRequestError
from choral.executor import Request

TOKENS = [17, 305, 2201, 45, 978, 1500, 33, 640, 91, 1200, 7, 256]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, prompt_logprobs=2, ignore_eos=True)
TOL = 1e-4


@pytest.fixture(scope="module")
def llm(tiny_chat_dir):  # type: ignore[no-untyped-def]
    with LLM(str(tiny_chat_dir), dtype="float32", kv_cache_tokens=1024, max_model_len=128, block_size=4,
             enable_prefix_caching=True) as model:
        yield model


def embeddings(llm: LLM, ids: list[int]) -> torch.Tensor:
    return llm.engine.loaded.model.embed_tokens(torch.tensor(ids)).clone()  # [n, hidden]


def same(a, b) -> None:  # type: ignore[no-untyped-def]
    """Same output tokens and logprobs (generated and prompt), within TOL."""
    out_a, out_b = a.outputs[0], b.outputs[0]
    assert out_a.token_ids == out_b.token_ids
    for la, lb in zip(out_a.logprobs, out_b.logprobs, strict=True):
        assert la.keys() == lb.keys()
        for t in la:
            assert abs(la[t].logprob - lb[t].logprob) < TOL
    for la, lb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
        top_a = {t: v.logprob for t, v in la.items() if v.rank <= 2}
        top_b = {t: v.logprob for t, v in lb.items() if v.rank <= 2}
        assert top_a.keys() == top_b.keys()
        assert all(abs(top_a[t] - top_b[t]) < TOL for t in top_a)


@pytest.mark.model
def test_soft_prompt_of_real_embeddings_equals_the_tokens(llm: LLM, tmp_path) -> None:
    want = llm.generate([TOKENS], PARAMS)[0]
    # placeholders in the middle of the prompt
    placeholder = 3
    prompt = TOKENS[:3] + [placeholder] * 4 + TOKENS[7:]
    soft = SoftPrompt(embeddings(llm, TOKENS[3:7]), placeholder_token_id=placeholder)
    got = llm.generate([prompt], PARAMS, soft_prompt=soft)[0]
    same(got, want)
    assert got.num_cached_tokens == 0  # never served from the plain prompt's blocks
    # prepended (PEFT prompt tuning), read from a safetensors file
    save_file({"prompt_embeddings": embeddings(llm, TOKENS[:5])}, str(tmp_path / "soft.safetensors"))
    soft_file = SoftPrompt.from_file(tmp_path / "soft.safetensors")
    assert soft_file.num_virtual_tokens == 5
    same(llm.generate([TOKENS[5:]], PARAMS, soft_prompt=soft_file)[0], want)
    # vLLM's prompt_embeds: the whole prompt as vectors
    same(llm.generate({"prompt_embeds": embeddings(llm, TOKENS)}, PARAMS)[0], want)


@pytest.mark.model
def test_prefix_cache_treats_soft_prompts_as_content(llm: LLM) -> None:
    placeholder = 3
    prompt = [placeholder] * 8 + TOKENS
    a = SoftPrompt(embeddings(llm, TOKENS[:8]), placeholder_token_id=placeholder)
    b = SoftPrompt(embeddings(llm, TOKENS[4:12]), placeholder_token_id=placeholder)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate([prompt], greedy, soft_prompt=a)[0]
    other = llm.generate([prompt], greedy, soft_prompt=b)[0]
    again = llm.generate([prompt], greedy, soft_prompt=SoftPrompt(a.embeddings.clone(), placeholder))[0]
    assert other.num_cached_tokens == 0
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    alone_b = llm.generate([TOKENS[4:12] + TOKENS], greedy)[0]
    assert other.outputs[0].token_ids == alone_b.outputs[0].token_ids


@pytest.mark.model
def test_bad_soft_prompts_are_refused(llm: LLM, tmp_path) -> None:
    hidden = llm.engine.loaded.spec.hidden_size
    with pytest.raises(InvalidRequestError, match="hidden size"):
        llm.generate([TOKENS], PARAMS, soft_prompt=SoftPrompt(torch.zeros(2, hidden + 1)))
    with pytest.raises(InvalidRequestError, match="placeholder 3 1 times, the soft prompt has 2 vectors"):
        llm.generate([[3, 5, 6]], PARAMS, soft_prompt=SoftPrompt(torch.zeros(2, hidden), placeholder_token_id=3))
    with pytest.raises(InvalidRequestError, match="NaN"):
        SoftPrompt(torch.full((2, hidden), float("nan")))
    with pytest.raises(InvalidRequestError, match=r"\[n_virtual, hidden\]"):
        SoftPrompt(torch.zeros(hidden))
    with pytest.raises(InvalidRequestError, match="cannot read"):
        SoftPrompt.from_file(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidRequestError, match="soft_prompt: must be a SoftPrompt"):
        Request(TOKENS, soft_prompt=torch.zeros(2, hidden))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="prompt_embeds: give it alone"):
        llm.generate({"prompt_embeds": torch.zeros(2, hidden), "prompt": "x"}, PARAMS)
    assert llm.engine.pool.num_used_blocks == 0
