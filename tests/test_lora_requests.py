"""Adapters per request through the executor and LLM.generate, on a tiny random llama with
SmolLM2's tokenizer: outputs equal the PEFT-merged model's (greedy, beams, preemption), the
prefix cache keys on the adapter, LRU slots under a cap, load/unload while running, refusals."""

from __future__ import annotations

import threading

import pytest
import torch

from choral import LLM, SamplingParams
from choral.errors import ConfigError, InvalidRequestError, LoraLoadError, UnknownLoraError
from choral.executor import Executor, Request
from tests.conftest import hf_class, make_tiny_model
from tests.lora_helpers import ALL_MODULES, make_peft_adapter

PROMPTS = ["Hello there, how are you", "The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def lora_dirs(tiny_chat_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Five random adapters of the tiny chat llama and, for the first, its merged model."""
    from transformers import AutoTokenizer

    dirs = []
    merged_dir = tmp_path_factory.mktemp("merged")
    for i in range(5):
        base = hf_class("llama").from_pretrained(str(tiny_chat_dir), dtype=torch.float32).eval()
        d = tmp_path_factory.mktemp(f"adapter{i}")
        targets = ALL_MODULES if i % 2 == 0 else ["q_proj", "v_proj", "down_proj"]
        model = make_peft_adapter(base, d, seed=i, scale=0.3, r=[16, 8, 4, 16, 8][i], lora_alpha=16,
                                  target_modules=targets)
        if i == 0:
            model.merge_and_unload().save_pretrained(str(merged_dir), safe_serialization=True)
            AutoTokenizer.from_pretrained(str(tiny_chat_dir)).save_pretrained(str(merged_dir))
        dirs.append(d)
    return dirs, merged_dir


def make_llm(directory, **options) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(directory), dtype="float32", kv_cache_tokens=2048, max_model_len=256, **options)


def texts(outputs) -> list[str]:  # type: ignore[no-untyped-def]
    return [o.outputs[0].text for o in outputs]


@pytest.mark.model
def test_adapter_equals_merged_model(tiny_chat_dir, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    dirs, merged_dir = lora_dirs
    with make_llm(tiny_chat_dir, enable_lora=True) as llm, make_llm(merged_dir) as merged:
        llm.load_lora("a0", str(dirs[0]))
        base = texts(llm.generate(PROMPTS, GREEDY))
        adapted = texts(llm.generate(PROMPTS, GREEDY, lora="a0"))
        want = texts(merged.generate(PROMPTS, GREEDY))
        assert adapted == want
        assert adapted != base
        # Beam search forks keep the adapter.
        beam = SamplingParams(beam_width=3, n=2, max_tokens=8, temperature=0.0)
        got = llm.generate(PROMPTS[:2], beam, lora="a0")
        ref = merged.generate(PROMPTS[:2], beam)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in ref]
        # One generate mixing the adapter and the base model row by row.
        mixed = texts(llm.generate(PROMPTS, GREEDY, lora=["a0", None, "a0", None]))
        assert mixed == [want[0], base[1], want[2], base[3]]


@pytest.mark.model
def test_preemption_keeps_the_adapter(tiny_chat_dir, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    dirs, merged_dir = lora_dirs
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [p + " and so on" * 3 for p in PROMPTS] * 2
    # 8 requests of ~60 tokens in 192 cache tokens: sequences are preempted and recomputed.
    with LLM(str(tiny_chat_dir), dtype="float32", kv_cache_tokens=192, max_model_len=96, block_size=4,
             enable_lora=True) as llm, make_llm(merged_dir) as merged:
        llm.load_lora("a0", str(dirs[0]))
        got = llm.generate(prompts, long, lora="a0")
        assert texts(got) == texts(merged.generate(prompts, long))
        assert llm.executor.aggregate.total_preemptions > 0


@pytest.mark.model
def test_prefix_cache_keys_on_the_adapter(tiny_chat_dir, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    dirs, _ = lora_dirs
    prompt = "A long shared system prompt that fills several KV blocks of the cache " * 3
    with make_llm(tiny_chat_dir, enable_lora=True, enable_prefix_caching=True) as llm:
        llm.load_lora("a0", str(dirs[0]))
        llm.load_lora("a1", str(dirs[1]))
        first = llm.generate(prompt, GREEDY, lora="a0")[0]
        other = llm.generate(prompt, GREEDY, lora="a1")[0]
        base = llm.generate(prompt, GREEDY)[0]
        again = llm.generate(prompt, GREEDY, lora="a0")[0]
        assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0 and base.num_cached_tokens == 0
        assert again.num_cached_tokens > 0
        assert again.outputs[0].text == first.outputs[0].text
    with make_llm(tiny_chat_dir, enable_lora=True) as fresh:
        fresh.load_lora("a1", str(dirs[1]))
        assert fresh.generate(prompt, GREEDY, lora="a1")[0].outputs[0].text == other.outputs[0].text


@pytest.mark.model
def test_lru_slots_cap_two_with_five_adapters(tiny_chat_dir, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    dirs, _ = lora_dirs
    names = [f"a{i}" for i in range(5)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    loras = [names[i % 5] if i % 6 else None for i in range(12)]
    with make_llm(tiny_chat_dir, enable_lora=True, max_loras=2) as llm:
        for name, d in zip(names, dirs, strict=True):
            llm.load_lora(name, str(d))
        together = texts(llm.generate(prompts, GREEDY, lora=loras))
        slots = llm.engine.runner.lora_slots
        assert slots is not None and slots.num_evictions > 0 and len(slots.resident_ids) == 2
        alone = [texts(llm.generate(p, GREEDY, lora=name))[0] for p, name in zip(prompts, loras, strict=True)]
        assert together == alone
        assert len(set(alone)) > 4  # the adapters differ


@pytest.mark.model
def test_refusals(tiny_chat_dir, lora_dirs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dirs, _ = lora_dirs
    with make_llm(tiny_chat_dir) as plain:
        with pytest.raises(ConfigError, match="enable_lora"):
            plain.load_lora("a0", str(dirs[0]))
        with pytest.raises(ConfigError, match="enable_lora"):
            plain.generate("hi", GREEDY, lora="a0")
    with make_llm(tiny_chat_dir, enable_lora=True, max_lora_rank=8) as llm:
        with pytest.raises(UnknownLoraError, match="'nope' is not loaded"):
            llm.generate("hi", GREEDY, lora="nope")
        with pytest.raises(LoraLoadError, match="exceeds max_lora_rank 8"):
            llm.load_lora("big", str(dirs[0]))
        with pytest.raises(LoraLoadError, match="not a directory"):
            llm.load_lora("x", str(tmp_path / "missing"))
        (tmp_path / "adapter.gguf").write_bytes(b"GGUF")
        with pytest.raises(LoraLoadError, match="cannot read .* as GGUF"):
            llm.load_lora("g", str(tmp_path / "adapter.gguf"))
        # An adapter of another model (a qwen3 of other sizes) is refused, naming the module.
        qwen = make_tiny_model("qwen3", tmp_path / "qwen")
        make_peft_adapter(qwen, tmp_path / "qwen-lora", seed=0, r=4, lora_alpha=8, target_modules=["q_proj"])
        with pytest.raises(LoraLoadError, match="q_proj maps 64 -> 128 features"):
            llm.load_lora("q", str(tmp_path / "qwen-lora"))
        with pytest.raises(InvalidRequestError, match="lora: must be an adapter name"):
            Request("hi", lora="")  # type: ignore[arg-type]
        llm.load_lora("a1", str(dirs[1]))
        with pytest.raises(LoraLoadError, match="already loaded"):
            llm.load_lora("a1", str(dirs[1]))
        assert llm.list_loras() == ["a1"]
        assert llm.engine.pool.num_used_blocks == 0  # nothing was queued by the refusals


@pytest.mark.model
def test_unload_while_running(tiny_chat_dir, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    dirs, _ = lora_dirs
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    with make_llm(tiny_chat_dir, enable_lora=True, max_loras=2) as llm:
        llm.load_lora("a2", str(dirs[2]))
        alone = texts(llm.generate(PROMPTS[0], params, lora="a2"))[0]
        ex: Executor = llm.executor
        started, done = threading.Event(), threading.Event()
        pieces: list[str] = []

        def on_response(r) -> None:  # type: ignore[no-untyped-def]
            assert r.result is not None
            pieces.append(r.result.text)
            started.set()
            if r.result.is_final:
                done.set()

        ex.enqueue(Request(PROMPTS[0], params, streaming=True, lora="a2", callback=on_response))
        assert started.wait(30)
        llm.unload_lora("a2")  # the running request keeps its adapter
        with pytest.raises(UnknownLoraError):
            ex.enqueue(Request(PROMPTS[0], params, lora="a2"))
        llm.load_lora("a2", str(dirs[3]))  # the name again, other weights: a new adapter
        other = ex.submit(Request(PROMPTS[0], params, lora="a2"), timeout=60)
        assert done.wait(60)
        assert "".join(pieces) == alone
        assert other.outputs[0].text != alone


@pytest.mark.model
def test_conversations_with_adapters(tiny_chat_dir, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    """Conversations created with an adapter (forks keep it) give what generate gives with it; a
    batch takes at most max_loras adapters, the others wait for the next infer()."""
    from choral.conversation import BatchedExecutor
    from choral.errors import IncompatibleStateError

    dirs, _ = lora_dirs
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with make_llm(tiny_chat_dir, enable_lora=True, max_loras=1) as llm:
        llm.load_lora("a0", str(dirs[0]))
        llm.load_lora("a1", str(dirs[1]))
        ids = llm.get_tokenizer().encode(PROMPTS[1])
        want = {name: llm.generate([ids], params, lora=name)[0].outputs[0].token_ids for name in ("a0", "a1", None)}
        assert len({tuple(v) for v in want.values()}) == 3
        ex = BatchedExecutor(llm)
        convs = {name: ex.create(lora=name) for name in ("a0", "a1", None)}
        assert convs["a0"].lora == "a0" and convs[None].lora is None
        for c in convs.values():
            c.prompt(ids)
        ex.infer()  # max_loras 1: a0 and the base model; a1 waits
        assert not convs["a0"].requires_inference and convs["a1"].requires_inference
        ex.infer()
        fork = convs["a0"].fork()
        assert fork.lora == "a0"
        got: dict[str | None, list[int]] = {name: [] for name in convs}
        got_fork: list[int] = []
        for _ in range(6):
            for name, c in convs.items():
                token = c.sample()
                got[name].append(token)
                c.prompt(token)
            token = fork.sample()
            got_fork.append(token)
            fork.prompt(token)
            while ex.batched_token_count:
                ex.infer()
        assert got == want
        assert got_fork == want["a0"]
        # Saved with its adapter; loaded back it runs with the same one and goes on identically.
        state = convs["a0"].save()
        restored = ex.load(state)
        assert restored.lora == "a0"
        for _ in range(2):
            token = convs["a0"].sample()
            assert restored.sample() == token
            convs["a0"].prompt(token)
            restored.prompt(token)
            while ex.batched_token_count:
                ex.infer()
        with pytest.raises(UnknownLoraError):
            ex.create(lora="nope")
        ex.load_lora("a4", str(dirs[4]))
        assert "a4" in llm.list_loras()  # one registry for the LLM and its conversations
        ex.unload_lora("a4")
        # The adapter must be loaded under its name, with the same weights.
        ex.unload_lora("a0")
        with pytest.raises(IncompatibleStateError, match="adapter 'a0', which is not loaded"):
            ex.load(state)
        ex.load_lora("a0", str(dirs[2]))
        with pytest.raises(IncompatibleStateError, match="has other weights"):
            ex.load(state)
        ex.unload_lora("a0")
        ex.load_lora("a0", str(dirs[0]))  # reloaded from the same files: the same digest
        assert ex.load(state).lora == "a0"
        assert llm.engine.pool.num_used_blocks > 0
