"""The bundled Gemma 3 270M (Q4_K_M GGUF) against transformers loading the same file.

Both sides dequantize the same GGUF tensors to fp32 (ours through the ``gguf`` package, theirs
through transformers' own GGUF loader and name mapping), so the forwards should agree to float
rounding: logits within 2e-3 absolute (~1e-4 of their range: the 18 layers and the 262k-way
lm_head sum in different orders) and the same top-1 token at every position of a ~250-token
text (measured: 1.8e-4 max on logits up to 39); greedy outputs token-identical. That parity
pins ``weights="dequantize"``; the default on the CPU keeps the tensors packed (integer-dot
kernels, activations quantized to int8 per block, as llama.cpp), which moves logits by more than
float rounding, so the native path is checked for agreement with the fp32 forward and for sense.
"""

from __future__ import annotations

import pytest
import torch

from choral import LLM, SamplingParams
from choral.engine.model_runner import Chunk
from choral.loader.resolve import resolve_model_path

# Loads the bundled Gemma 3 270M (and transformers on the same file): the full tier.
pytestmark = pytest.mark.model

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
TEXT = ("The history of the Roman Empire spans many centuries. It began when Augustus became the first "
        "emperor in 27 BC, and in the West it ended in 476 AD. ") * 6
LOGITS_TOL = 2e-3


@pytest.fixture(scope="module")
def gemma() -> LLM:
    return LLM("gemma3-270m", dtype="float32", weights="dequantize", kv_cache_tokens=4096, max_model_len=2048)


@pytest.fixture(scope="module")
def gemma_native() -> LLM:
    llm = LLM("gemma3-270m", kv_cache_tokens=4096, max_model_len=2048)
    assert llm.engine.loaded.model.native  # the CPU default: Q4_K / Q6_K / Q5_0 / Q8_0 kept packed
    return llm


@pytest.fixture(scope="module")
def hf_gemma():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("gemma3-270m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_spec_tokenizer_and_chat_template(gemma: LLM) -> None:
    spec = gemma.engine.loaded.spec
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.head_dim) == ("gemma3", 18, 640, 256)
    assert (spec.num_heads, spec.num_kv_heads, spec.vocab_size) == (4, 1, 262144)
    assert spec.layer_windows == tuple(None if i in (5, 11, 17) else 512 for i in range(18))
    assert spec.rope.theta == 1e6 and spec.local_rope is not None and spec.local_rope.theta == 1e4
    tok = gemma.tokenizer
    assert tok is not None and tok.vocab_size == 262144
    assert tok.eos_token_ids == (1, 106)  # <eos>, <end_of_turn>
    assert tok.encode("Hello world") == [2, 9259, 1902]  # <bos> first, SentencePiece pieces
    assert tok.decode(tok.encode("naïve café, 日本語\n\n  x")) == "naïve café, 日本語\n\n  x"
    ids = tok.apply_chat_template([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ])
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
    assert ids[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user: special tokens, not their text


def test_logits_match_transformers(gemma: LLM, hf_gemma) -> None:  # type: ignore[no-untyped-def]
    assert gemma.tokenizer is not None
    ids = gemma.tokenizer.encode(TEXT)
    assert len(ids) > 200
    engine = gemma.engine
    table = engine.pool.allocate(-(-len(ids) // engine.pool.block_size))
    # Two chunks, so the second reads the first's K/V through the paged cache.
    (first,) = engine.runner.execute([Chunk(ids[:97], 0, table, logits="all")])
    (second,) = engine.runner.execute([Chunk(ids[97:], 97, table, logits="all")])
    engine.pool.free(table)
    assert first is not None and second is not None
    mine = torch.cat([first, second])  # [len(ids), vocab]
    with torch.no_grad():
        ref = hf_gemma(torch.tensor([ids])).logits[0].float()
    assert (mine - ref).abs().max().item() <= LOGITS_TOL
    assert torch.equal(mine.argmax(-1), ref.argmax(-1))


# The GGUF holds the pretrained (not instruction-tuned) 270M model: it continues text well and
# echoes chat questions rather than answering them, so its sense is checked on completions.
COMPLETIONS = {
    "Paris is the capital of": " France",
    "The first five prime numbers are 2, 3,": " 5, 7, and 11",
    "Question: What is the capital of France?\nAnswer:": " Paris",
    "Water boils at a temperature of": " 100 degrees Celsius",
}


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=[1, 106],
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_completions_are_sensible_and_match_transformers(gemma: LLM, hf_gemma) -> None:  # type: ignore[no-untyped-def]
    outs = gemma.generate(list(COMPLETIONS), SamplingParams(temperature=0, max_tokens=12))
    for out, expected in zip(outs, COMPLETIONS.values(), strict=True):
        assert out.outputs[0].text.startswith(expected), out.outputs[0].text
        assert out.outputs[0].token_ids == _hf_greedy(hf_gemma, out.prompt_token_ids, 12)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    for out in gemma.generate(chats, SamplingParams(temperature=0, max_tokens=16)):
        assert out.outputs[0].token_ids == _hf_greedy(hf_gemma, out.prompt_token_ids, 16)
    assert gemma.engine.pool.num_free_blocks == gemma.engine.pool.num_blocks


def test_native_weights_agree_with_the_fp32_forward(gemma: LLM, gemma_native: LLM) -> None:
    """Packed weights + int8 activations: the same top-1 token at >= 95% of a ~250-token text's
    positions as the dequantized fp32 forward, and sensible greedy completions."""
    assert gemma.tokenizer is not None
    ids = gemma.tokenizer.encode(TEXT)
    argmax = []
    for llm in (gemma, gemma_native):
        engine = llm.engine
        table = engine.pool.allocate(-(-len(ids) // engine.pool.block_size))
        (logits,) = engine.runner.execute([Chunk(ids, 0, table, logits="all")])
        engine.pool.free(table)
        assert logits is not None
        argmax.append(logits.argmax(-1))
    agreement = (argmax[0] == argmax[1]).float().mean().item()
    assert agreement >= 0.95, agreement
    outs = gemma_native.generate(list(COMPLETIONS), SamplingParams(temperature=0, max_tokens=12))
    hits = sum(out.outputs[0].text.startswith(expected) for out, expected in zip(outs, COMPLETIONS.values(),
                                                                                 strict=True))
    assert hits >= len(COMPLETIONS) - 1, [out.outputs[0].text for out in outs]
    assert gemma_native.engine.pool.num_free_blocks == gemma_native.engine.pool.num_blocks
