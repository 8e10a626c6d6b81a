"""The bundled SmolLM2 with a random PEFT adapter: greedy text differs from the base model's and
equals the merged model's (PEFT merge_and_unload, saved and loaded as a plain HF directory). The
same adapter as a GGUF LoRA file (llama.cpp's format, q/k rows permuted over 9 query and 3 KV
heads) gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from choral import LLM, SamplingParams
from tests.lora_helpers import ALL_MODULES, make_peft_adapter, write_gguf_lora

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.mark.model
def test_bundled_adapter_equals_merged_model(smollm_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                              dtype=torch.float32).eval()
    peft_model = make_peft_adapter(hf, tmp_path / "adapter", seed=7, scale=0.1, r=16, lora_alpha=32,
                                   target_modules=ALL_MODULES)
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    merged = peft_model.merge_and_unload()
    # A model read from GGUF refuses save_pretrained: write the plain HF directory ourselves.
    config = merged.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.to_json_file(str(merged_dir / "config.json"))
    state = {k: v.contiguous() for k, v in merged.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(merged_dir / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    tok.save_pretrained(str(merged_dir))
    write_gguf_lora(tmp_path / "adapter", tmp_path / "adapter.gguf", "llama", config.num_attention_heads,
                    config.num_key_value_heads)
    del hf, peft_model, merged

    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    with LLM(str(smollm_path), dtype="float32", weights="dequantize", kv_cache_tokens=4096, max_model_len=512,
             enable_lora=True) as llm:
        llm.load_lora("random", str(tmp_path / "adapter"))
        base = [o.outputs[0] for o in llm.chat(chats, greedy)]
        adapted = [o.outputs[0] for o in llm.chat(chats, greedy, lora="random")]
        llm.load_lora("random-gguf", str(tmp_path / "adapter.gguf"))
        from_gguf = [o.outputs[0] for o in llm.chat(chats, greedy, lora="random-gguf")]
    with LLM(str(merged_dir), dtype="float32", kv_cache_tokens=4096, max_model_len=512) as merged:
        want = [o.outputs[0] for o in merged.chat(chats, greedy)]
    assert [o.token_ids for o in adapted] == [o.token_ids for o in want]
    assert [o.token_ids for o in from_gguf] == [o.token_ids for o in want]
    assert all(a.text != b.text for a, b in zip(adapted, base, strict=True))
