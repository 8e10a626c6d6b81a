"""Gemma 3 (text) against transformers' Gemma3ForCausalLM on tiny random models (fp32, 1e-4).

The tiny configs (tests/conftest.py) interleave sliding-window and global layers with their own
rope bases; ``gemma3-hd256`` has Gemma 3 270M's attention shape (head_dim 256, 4 query heads on
1 KV head), which the C attention kernel runs on its block-16 fast path. Sequences here run to
several windows long, through chunked prefill, mixed batches, the Executor and conversations.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from choral import LLM, BatchedExecutor, SamplingParams
from choral.errors import ModelLoadError
from choral.executor import Executor, Request
from choral.kernels.paged_attention import PagedAttention
from choral.models.gemma3 import GEMMA3
from tests.conftest import hf_class, tiny_config
from tests.test_hf_parity import hf_logits, make_engine, run_schedule

# Every test builds a tiny transformers model to compare with: the full tier (pytest --fast leaves them out).
pytestmark = pytest.mark.model

TOL = 1e-4


def _block_size(arch: str) -> int:
    return 16 if arch.endswith("hd256") else 4


# ---- config reading -----------------------------------------------------------------------------
def test_spec_from_transformers_config(tiny_models) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_models["gemma3"][0], "torch")
    spec = engine.loaded.spec
    assert spec.architecture == "gemma3"
    assert spec.layer_windows == (12, None, 12)  # sliding_window_pattern=2: every 2nd layer global
    assert (spec.rope.theta, spec.rope.kind, spec.rope.factor) == (5000.0, "linear", 2.0)
    assert spec.local_rope is not None and (spec.local_rope.theta, spec.local_rope.kind) == (300.0, "default")
    assert spec.attention_scale == 24**-0.5
    assert spec.embed_scale == 8.0 and spec.hidden_act == "gelu_tanh"
    assert spec.norm_unit_offset and spec.sandwich_norms and spec.qk_norm and spec.tie_word_embeddings
    assert spec.final_logit_softcap is None


def test_spec_from_older_flat_config() -> None:
    """Configs written before transformers 5 (Gemma 3's own releases): flat rope keys, a pattern
    instead of layer_types, hidden_act next to hidden_activation."""
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }
    spec = GEMMA3.spec_from_hf(config)
    assert spec.layer_windows == tuple(None if i in (5, 11, 17) else 512 for i in range(18))
    assert spec.rope.theta == 1e6 and spec.local_rope is not None and spec.local_rope.theta == 1e4
    assert spec.layer_rope(5) is spec.rope and spec.layer_rope(4) is spec.local_rope
    assert spec.tie_word_embeddings and spec.attention_scale == 1 / 16
    scaled = GEMMA3.spec_from_hf({**config, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (scaled.rope.kind, scaled.rope.factor, scaled.local_rope and scaled.local_rope.kind) == (
        "linear", 8.0, "default")


@pytest.mark.parametrize("change, message", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "relu"}, "hidden_activation 'relu'"),
    ({"layer_types": ["sliding_attention"]}, "layer_types lists 1 layers"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}, "rope type 'yarn'"),
])
def test_unsupported_configs_are_refused(tiny_models, change: dict, message: str) -> None:  # type: ignore[type-arg, no-untyped-def]
    config = tiny_config("gemma3").to_dict()
    config.update(change)
    with pytest.raises(ModelLoadError, match=message):
        GEMMA3.spec_from_hf(config)


# ---- logits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "kernel"])
@pytest.mark.parametrize("arch", ["gemma3", "gemma3-hd256"])
def test_sequences_several_windows_long_in_chunks_and_mixed_batches(tiny_models, arch: str, backend: str) -> None:  # type: ignore[no-untyped-def]
    """Three sequences 3-8 windows long: prompt chunks of uneven sizes next to decodes of the
    others, every row's logits against transformers' full forward."""
    if backend == "kernel" and PagedAttention.load() is None:
        pytest.skip("no C compiler: the kernel backend is unavailable")
    directory, hf = tiny_models[arch]
    engine = make_engine(directory, backend, block_size=_block_size(arch))
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (96, 70, 40)]
    schedule = [
        [(0, 7), (1, 30)],
        [(0, 33), (1, 1), (2, 25)],  # seq 1 decodes while the others prefill
        [(0, 16), (1, 1), (2, 1)],
        [(0, 25), (1, 23), (2, 14)],
    ]
    for _ in range(15):
        schedule.append([(0, 1), (1, 1)])
    got = run_schedule(engine, seqs, schedule)
    worst = 0.0
    for i, tokens in enumerate(seqs):
        ref = hf_logits(hf, tokens)
        assert len(got[i]) == len(tokens)
        for pos, row in got[i].items():
            worst = max(worst, (row - ref[pos]).abs().max().item())
    assert worst <= TOL, f"{arch}/{backend}: max |diff| {worst:.2e}"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_final_logit_softcapping(tmp_path: Path) -> None:
    torch.manual_seed(5)
    config = tiny_config("gemma3")
    config.final_logit_softcapping = 0.5  # far below the raw logits' range: the cap shapes every row
    hf = hf_class("gemma3")(config).eval()
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    engine = make_engine(tmp_path, "torch")
    assert engine.loaded.spec.final_logit_softcap == 0.5
    tokens = list(range(3, 40))
    (got,) = run_schedule(engine, [tokens], [[(0, 20)], [(0, 17)]])
    ref = hf_logits(hf, tokens)
    assert ref.abs().max() < 0.5
    assert max((row - ref[pos]).abs().max().item() for pos, row in got.items()) <= TOL


# ---- the engine's drivers -----------------------------------------------------------------------
def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["gemma3", "gemma3-hd256"])
def test_executor_greedy_equals_transformers(tiny_models, arch: str) -> None:  # type: ignore[no-untyped-def]
    directory, hf = tiny_models[arch]
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (5, 40, 1, 64, 23)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with Executor(str(directory), dtype="float32", block_size=_block_size(arch), kv_cache_tokens=1024,
                  max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4) as ex:
        ids = ex.enqueue_many([Request(p, params) for p in prompts])
        for rid, prompt in zip(ids, prompts, strict=True):
            (response,) = ex.await_responses(rid, timeout=120)
            assert response.result is not None
            assert response.result.output_token_ids == _hf_greedy(hf, prompt, 20)
        assert ex.kv.pool.num_used_blocks == 0


def test_llm_generate_greedy_equals_transformers(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, hf = tiny_models["gemma3"]
    llm = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512)
    prompts = [[5, 9, 33, 71, 100, 4], list(range(10, 40))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, 16)


def test_conversations_fork_and_save_load_continue_like_transformers(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    directory, hf = tiny_models["gemma3"]
    prompt = [(i * 7) % 120 + 3 for i in range(30)]  # 2.5 windows
    with BatchedExecutor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512,
                         max_model_len=128) as executor:
        parent = executor.create()
        parent.prompt(prompt)
        executor.infer()
        child = parent.fork()
        parent.save(tmp_path / "state")
        outs = []
        for c in (parent, child):
            tokens = []
            for _ in range(12):
                tokens.append(c.sample())
                c.prompt(tokens[-1])
                executor.infer()
            outs.append(tokens)
        assert outs[0] == outs[1] == _hf_greedy(hf, prompt, 12)
        loaded = executor.load(tmp_path / "state")
        assert loaded.sample() == outs[0][0]
        executor.check_invariants()


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_context_shift_rotates_keys_with_the_layers_own_rope(layer_type: str, tmp_path: Path) -> None:
    """A 1-layer model (K/V depend on token and position only): after shift_left the logits equal
    a fresh run of the kept tokens, for a local layer (base 300) and a global one (5000, linear 2)."""
    torch.manual_seed(7)
    config = tiny_config("gemma3")
    config.num_hidden_layers = 1
    config.layer_types = [layer_type]
    hf_class("gemma3")(config).eval().save_pretrained(str(tmp_path), safe_serialization=True)
    with BatchedExecutor(str(tmp_path), dtype="float32", block_size=4, kv_cache_tokens=512,
                         max_model_len=64) as executor:
        tokens = [(i * 13) % 120 + 3 for i in range(30)]
        c = executor.create()
        c.prompt(tokens)
        executor.infer()
        c.shift_left(keep=3, discard=11)
        c.prompt(50)
        executor.infer()
        fresh = executor.create()
        fresh.prompt([*tokens[:3], *tokens[14:], 50])
        executor.infer()
        assert (c.logits() - fresh.logits()).abs().max() <= 1e-3


# ---- GGUF ---------------------------------------------------------------------------------------
_GGUF_LAYER = {  # HF name -> llama.cpp's gemma3 name
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _write_gemma3_gguf(hf, path: Path) -> None:  # type: ignore[no-untyped-def]
    """What llama.cpp's converter writes for Gemma 3: its tensor names, norms with the 1 added,
    the local rope base and the layer pattern as their own keys."""
    import gguf
    import numpy as np

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_uint32("gemma3.attention.sliding_window_pattern", 2)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_float32("gemma3.rope.freq_base_swa", cfg.rope_parameters["sliding_attention"]["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_parameters["full_attention"]["factor"])
    state = hf.state_dict()
    pairs = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")]
    for i in range(cfg.num_hidden_layers):
        pairs += [(f"model.layers.{i}.{h}", f"blk.{i}.{g}") for h, g in _GGUF_LAYER.items()]
    for hf_name, g_name in pairs:
        data = state[hf_name].float().numpy()
        if g_name.endswith("norm.weight"):
            data = data + 1.0
        w.add_tensor(g_name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()


def test_gguf_written_like_llama_cpp_matches_transformers(tmp_path: Path) -> None:
    torch.manual_seed(9)
    config = tiny_config("gemma3")
    config.query_pre_attn_scalar = config.head_dim  # llama.cpp's scale below 62 layers
    hf = hf_class("gemma3")(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "tiny-gemma3.gguf"
    _write_gemma3_gguf(hf, path)
    engine = make_engine(path, "torch")
    spec = engine.loaded.spec
    assert spec.layer_windows == (12, None, 12) and spec.local_rope is not None
    assert (spec.local_rope.theta, spec.rope.theta, spec.rope.kind, spec.rope.factor) == (300.0, 5000.0, "linear", 2.0)
    tokens = [(i * 5) % 120 + 3 for i in range(40)]
    (got,) = run_schedule(engine, [tokens], [[(0, 25)], [(0, 15)]])
    ref = hf_logits(hf, tokens)
    assert max((row - ref[pos]).abs().max().item() for pos, row in got.items()) <= TOL
