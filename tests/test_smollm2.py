"""The bundled SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from choral import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()


def test_greedy_batch_is_token_identical_to_transformers(smollm_fp32, hf_smollm) -> None:  # type: ignore[no-untyped-def]
    llm = smollm_fp32
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.generate(chats, SamplingParams(temperature=0, max_tokens=32))
    eos = llm.engine.eos_token_ids
    for out in outs:
        prompt = out.prompt_token_ids
        with torch.no_grad():
            ref = hf_smollm.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=list(eos), pad_token_id=eos[0])
        ref_ids = ref[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref_ids, (out.outputs[0].text,)
    assert "Paris" in outs[0].outputs[0].text
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_prompt_matches_chat_template(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    tok = smollm_fp32.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert ids[0] == 1 and len(ids) == 37  # <|im_start|>, default system prompt inserted
    assert tok.eos_token_ids == (2,)


def test_prompt_logprobs_match_full_forward(smollm_fp32, hf_smollm) -> None:  # type: ignore[no-untyped-def]
    llm = smollm_fp32
    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    with torch.no_grad():
        ref = hf_smollm(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-3
        assert entry[prompt[pos]].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1
        best = next(t for t, e in entry.items() if e.rank == 1)
        assert best == int(ref[pos - 1].argmax())
        assert entry[best].decoded_token == llm.tokenizer.decode([best], False)
        assert len(entry) in (2, 3)  # the top 2, plus the prompt token when it is not among them
