"""Embeddings: the final hidden states against transformers' own, pooling, normalization, batching,
and /v1/embeddings in process on a tiny random model."""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
import pytest
import torch
from test_server_edges import serve_asgi

from choral.config import EngineConfig
from choral.engine.embedder import Embedder
from choral.engine.llm_engine import LLMEngine
from choral.errors import InvalidRequestError
from choral.executor import Executor, ExecutorConfig

INPUTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [3]]


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> LLMEngine:
    directory, _ = tiny_models["llama"]
    return LLMEngine(EngineConfig.from_kwargs(model=str(directory), dtype="float32", block_size=4,
                                              kv_cache_tokens=256, max_model_len=64))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_hidden_states_match_transformers(tiny_models: Any, engine: LLMEngine, pooling: str) -> None:
    _, hf = tiny_models["llama"]
    embedder = Embedder(engine.loaded, engine.max_model_len, block_size=4)
    got = embedder.embed(INPUTS, pooling=pooling, normalize=False)
    for ids, vector in zip(INPUTS, got, strict=True):
        with torch.no_grad():  # transformers' last hidden state is after the final norm, as ours
            states = hf.model(torch.tensor([ids])).last_hidden_state[0].float()  # [T, hidden]
        want = states.mean(dim=0) if pooling == "mean" else states[-1]
        assert vector.shape == (hf.config.hidden_size,)
        torch.testing.assert_close(vector, want, atol=1e-4, rtol=1e-4)


def test_normalized_and_batched_equals_single(engine: LLMEngine) -> None:
    # A cache of 8 blocks of 4: the 17-token input needs 5, so the inputs go in several forwards.
    embedder = Embedder(engine.loaded, engine.max_model_len, block_size=4, capacity=32)
    together = embedder.embed(INPUTS)
    for ids, vector in zip(INPUTS, together, strict=True):
        assert abs(float(vector.norm()) - 1.0) < 1e-5
        (alone,) = embedder.embed([ids])
        torch.testing.assert_close(vector, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize(("inputs", "needle"), [
    ([[]], r"input\[0\]: empty"), ([[5, 999]], "token id 999 is out of range"), ([[5] * 65], "65 tokens exceed")])
def test_bad_inputs(engine: LLMEngine, inputs: list[list[int]], needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        Embedder(engine.loaded, engine.max_model_len, block_size=4).embed(inputs)


def test_embeddings_endpoint(tiny_models: Any) -> None:
    directory, hf = tiny_models["llama"]
    ex = Executor(str(directory), ExecutorConfig(), dtype="float32", block_size=4, kv_cache_tokens=256,
                  max_model_len=64)

    async def main(client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/embeddings", json={"input": INPUTS, "model": "tiny"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and body["model"] == "tiny"
        assert body["usage"] == {"prompt_tokens": sum(map(len, INPUTS)), "total_tokens": sum(map(len, INPUTS))}
        vectors = [torch.tensor(d["embedding"]) for d in body["data"]]
        assert all(v.shape == (hf.config.hidden_size,) and abs(float(v.norm()) - 1) < 1e-5 for v in vectors)
        single = (await client.post("/v1/embeddings", json={"input": INPUTS[2]})).json()["data"][0]["embedding"]
        torch.testing.assert_close(torch.tensor(single), vectors[2], atol=1e-5, rtol=1e-5)
        b64 = (await client.post("/v1/embeddings", json={"input": INPUTS[2], "encoding_format": "base64"})).json()
        raw = base64.b64decode(b64["data"][0]["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(single, abs=1e-6)
        r = await client.post("/v1/embeddings", json={"input": INPUTS[2], "truncate_prompt_tokens": 2,
                                                      "normalize": False})
        assert r.json()["usage"]["prompt_tokens"] == 2
        for bad, needle in [({"input": []}, "input is empty"), ({"input": [[5, 999]]}, "out of range"),
                            ({"input": "text"}, "no tokenizer"), ({"input": [5], "dimensions": 3}, "dimensions"),
                            ({"input": [5], "model": "other"}, "does not exist")]:
            r = await client.post("/v1/embeddings", json=bad)
            assert r.status_code in (400, 404) and needle in r.json()["error"]["message"], (bad, r.text)

    serve_asgi(ex, main)
    ex.shutdown(wait=False)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_conversation_embeddings(tiny_models: Any, engine: LLMEngine, pooling: str) -> None:
    from choral.conversation import BatchedExecutor
    from choral.errors import RequiresPromptError

    embedder = Embedder(engine.loaded, engine.max_model_len, block_size=4)
    with BatchedExecutor(engine, max_num_batched_tokens=8) as bx:  # 8 tokens a step: the long prompt takes 3
        conversations = [bx.create() for _ in INPUTS]
        for c, ids in zip(conversations, INPUTS, strict=True):
            c.prompt(ids, embeddings=True)
        while any(c.requires_inference for c in conversations):
            bx.infer()
        for c, want in zip(conversations, embedder.embed(INPUTS, pooling), strict=True):
            torch.testing.assert_close(c.embedding(pooling), want, atol=1e-5, rtol=1e-5)
            assert c.requires_sampling  # the logits are there too
        # A prompt after history: its tokens attend to the history (equal to embedding it all, for last).
        first = conversations[0]
        first.prompt([30, 31, 32], embeddings=True)
        bx.infer()
        if pooling == "last":
            (whole,) = embedder.embed([INPUTS[0] + [30, 31, 32]], "last")
            torch.testing.assert_close(first.embedding("last"), whole, atol=1e-5, rtol=1e-5)
        first.prompt([33])  # a prompt without embeddings forgets the last ones
        bx.infer()
        with pytest.raises(RequiresPromptError, match="embeddings=True"):
            first.embedding()
        with pytest.raises(InvalidRequestError, match="pooling"):
            conversations[1].embedding("max")
