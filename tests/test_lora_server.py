"""The server with adapters: --lora NAME=PATH, /v1/models with parents, the adapter's name as the
model in the official openai client, and vLLM's load / unload endpoints."""

from __future__ import annotations

import signal

import httpx
import pytest
import torch

from choral import LLM, SamplingParams
from tests.conftest import hf_class
from tests.lora_helpers import ALL_MODULES, make_peft_adapter
from tests.test_server import start_server

pytestmark = pytest.mark.model


def test_server_flow_with_openai_client(tiny_chat_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from openai import NotFoundError, OpenAI

    dirs = []
    for i in range(2):
        base = hf_class("llama").from_pretrained(str(tiny_chat_dir), dtype=torch.float32).eval()
        make_peft_adapter(base, tmp_path / f"a{i}", seed=10 + i, scale=0.3, r=8, lora_alpha=16,
                          target_modules=ALL_MODULES)
        dirs.append(tmp_path / f"a{i}")
    prompt = "The capital of France is"
    with LLM(str(tiny_chat_dir), dtype="float32", enable_lora=True, kv_cache_tokens=2048) as llm:
        llm.load_lora("x", str(dirs[0]))
        llm.load_lora("y", str(dirs[1]))
        greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        want = {name: llm.generate(prompt, greedy, lora=name)[0].outputs[0].text for name in ("x", "y")}
        want["base"] = llm.generate(prompt, greedy)[0].outputs[0].text
    assert len(set(want.values())) == 3

    proc, url = start_server("--model", str(tiny_chat_dir), "--served-model-name", "base",
                             "--lora", f"x={dirs[0]}", "--max-model-len", "256")
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"base", "x"}
        assert models["x"].parent == "base" and models["base"].parent is None  # type: ignore[attr-defined]

        def complete(model: str) -> str:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0.0,
                                            extra_body={"ignore_eos": True})
            assert out.model == model
            return out.choices[0].text

        assert complete("x") == want["x"]
        assert complete("base") == want["base"]
        with pytest.raises(NotFoundError):
            complete("y")
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(dirs[1])})
        assert r.status_code == 200, r.text
        assert complete("y") == want["y"]
        stream = client.chat.completions.create(model="y", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True)
        assert all(chunk.model == "y" for chunk in stream)
        # a bad path, a duplicate name, an unknown unload: clear 4xx answers, nothing changed
        bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": str(tmp_path)})
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        dup = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(dirs[1])})
        assert dup.status_code == 400 and "already loaded" in dup.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "nope"}).status_code == 404
        emb = httpx.post(f"{url}/v1/embeddings", json={"model": "y", "input": "hi"})
        assert emb.status_code == 400 and "LoRA adapter" in emb.json()["error"]["message"]
        pe = httpx.post(f"{url}/v1/completions", json={"model": "x", "prompt": "hi", "prompt_embeds": "AAAA"})
        assert pe.status_code == 400 and "prompt embeddings" in pe.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "y"}).status_code == 200
        with pytest.raises(NotFoundError):
            complete("y")
        assert {m.id for m in client.models.list().data} == {"base", "x"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
