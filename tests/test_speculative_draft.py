"""Speculative decoding with a draft model (choral/engine/draft_model.py), on tiny random models:
the same tokens as plain decoding (greedy and seeded sampling) in mixed batches with chunked
prefill, preemption, prefix-cache hits, n > 1 and stop ids, with a draft that agrees with the
target (the target itself) and one that often does not (its perturbed copy); the target's
distribution (chi-square); no target or draft block leaked by random requests with cancels;
the refusals (no draft model, another tokenizer or vocabulary, a request naming another draft)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from choral import LLM, SamplingParams
from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.errors import ConfigError, InvalidRequestError
from choral.executor import ExecutorConfig, Request
from choral.executor.job import Job
from choral.finish import FinishReason
from choral.speculative import SpeculativeConfig
from tests.conftest import hf_class, tiny_config
from tests.test_speculative import ENGINE, OFF, chi_square_three_tokens, drain, outputs, prompts, stepper

DRAFT = SpeculativeConfig(method="draft", k=4, p_min=0.0, adaptive=False)  # deterministic: no timing


@pytest.fixture(scope="module")
def drafts(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """"same": the target itself (its proposals are its own greedy tokens); "perturbed": the
    target with noise on every weight (it agrees on some tokens only)."""
    directory, _ = tiny_models["llama"]
    model = hf_class("llama").from_pretrained(str(directory), dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    perturbed = tmp_path_factory.mktemp("draft-perturbed")
    model.save_pretrained(str(perturbed))
    return {"same": directory, "perturbed": perturbed}


def loaded_target(tiny_models: Any) -> Any:
    directory, _ = tiny_models["llama"]
    return LLMEngine(EngineConfig(**{**ENGINE, "model": str(directory)}, kv_cache_tokens=512)).loaded


@pytest.fixture(scope="module")
def loaded(tiny_models: Any) -> Any:
    return loaded_target(tiny_models)


def draft_free(s: Any) -> None:
    draft = s.core.draft
    assert draft.kv.pool.num_used_blocks == 0 and draft.num_sequences == 0


@pytest.mark.model
@pytest.mark.parametrize("which", ["same", "perturbed"])
def test_greedy_same_tokens_with_chunked_prefill_preemption_and_prefix_hits(loaded: Any, drafts: Any,
                                                                            which: str) -> None:
    ps = prompts(0, 8)
    results = []
    for spec in (OFF, DRAFT):
        s = stepper(loaded, kv_cache_tokens=112, max_num_batched_tokens=12, draft_model=str(drafts[which]))
        jobs = [s.add(Request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                stop_token_ids=[7 + i], speculative=spec)))
                for i, p in enumerate(ps)]
        preempted = drain(s)
        draft_free(s)
        results.append((outputs(jobs), preempted, s.speculator.num_proposed, s.speculator.num_accepted,
                        s.kv.usage().prefix_hits))
    (plain, _, plain_proposed, _, _), (spec_out, preempted, proposed, accepted, hits) = results
    assert spec_out == plain
    assert plain_proposed == 0 and preempted > 0 and hits > 0
    assert proposed > 0 and accepted > 0
    if which == "same":
        assert accepted > 0.9 * proposed  # its own greedy tokens (the rest: proposals past a stop)
    else:
        assert accepted < 0.9 * proposed


@pytest.mark.model
def test_seeded_sampling_same_tokens_as_engine_default(loaded: Any, drafts: Any) -> None:
    """Seeded samples (n = 3, nearly greedy so the draft's picks are often drawn) are the same
    tokens with the draft proposing as without: one draw per token from each sample's generator."""
    params = dict(temperature=0.05, top_k=40, top_p=0.95, min_p=0.01, max_tokens=30, ignore_eos=True, n=3)
    ps = prompts(1, 4)
    got = []
    for spec in (OFF, DRAFT):
        s = stepper(loaded, ExecutorConfig(speculative=spec), draft_model=str(drafts["same"]))
        jobs = [s.add(Request(p, SamplingParams(seed=100 + i, **params)))  # type: ignore[arg-type]
                for i, p in enumerate(ps)]
        drain(s)
        draft_free(s)
        got.append((outputs(jobs), s.speculator.num_accepted))
    assert got[1][0] == got[0][0]
    assert got[1][1] > 0


@pytest.mark.model
def test_sampled_tokens_follow_the_target_distribution(loaded: Any, tiny_models: Any, drafts: Any) -> None:
    """(t1, t2, t3) drawn with the draft proposing t2 and t3, against their exact probabilities
    from the HF model, over three allowed tokens (27 cells) that include the target's greedy
    picks after the prompt, so proposals are accepted and t3 is often drawn at depth 1. The run
    is deterministic (the engine's sampler seed is fixed); the test asks p > 0.001."""
    _, hf = tiny_models["llama"]
    prompt = [5, 11, 40, 77, 40, 11, 77, 11, 11, 40]
    with torch.no_grad():
        first = int(hf(torch.tensor([prompt])).logits[0, -1].argmax())
        second = int(hf(torch.tensor([prompt + [first]])).logits[0, -1].argmax())
    allowed = list(dict.fromkeys([first, second, 11, 40, 77]))[:3]
    s = stepper(loaded, max_num_seqs=256, max_num_batched_tokens=2048, kv_cache_tokens=8192,
                draft_model=str(drafts["same"]))
    s.core.draft.max_catchup_tokens = 1 << 16  # every sequence's prompt into the draft at once
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, n=64, allowed_token_ids=allowed,
                            speculative=SpeculativeConfig(method="draft", k=2, p_min=0.0, adaptive=False))
    jobs = [s.add(Request(prompt, params)) for _ in range(160)]  # 10,240 draws of (t1, t2, t3)
    drain(s, limit=100_000)
    draft_free(s)
    counts: dict[tuple[int, ...], int] = {}
    for job in jobs:
        for q in job.returned:
            counts[tuple(q.output_token_ids)] = counts.get(tuple(q.output_token_ids), 0) + 1
    assert s.speculator.num_accepted > 2000  # t2 proposed in every draw, accepted when drawn as the greedy pick
    stat, p = chi_square_three_tokens(hf, prompt, allowed, counts)
    assert p > 1e-3, f"chi-square {stat:.1f} on 26 degrees of freedom: p = {p:.2g}"


@pytest.mark.model
def test_random_requests_with_cancels_leak_no_block(loaded: Any, drafts: Any) -> None:
    rnd = random.Random(11)
    s = stepper(loaded, kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=16,
                draft_model=str(drafts["perturbed"]))
    pending = prompts(2, 40)
    live: list[Job] = []
    added = 0
    while added < 300 or s.has_work:
        while added < 300 and len(live) < 24:
            spec = SpeculativeConfig(method="draft", k=rnd.randint(1, 6), p_min=rnd.choice([0.0, 0.02]),
                                     adaptive=rnd.random() < 0.5)
            temperature = rnd.choice([0.0, 0.8])
            sampling = SamplingParams(temperature=temperature, max_tokens=rnd.randint(1, 24),
                                      n=1 if temperature == 0 else rnd.choice([1, 2]), ignore_eos=True,
                                      speculative=spec)
            live.append(s.add(Request(pending[added % len(pending)], sampling)))
            added += 1
        if rnd.random() < 0.15:
            victim = rnd.choice(live)
            with s.core.lock:
                if not victim.ended:
                    s.responder.end_job(victim, FinishReason.CANCELLED)
        s.step()
        live = [j for j in live if not j.ended]
    drain(s)
    draft_free(s)
    assert s.speculator.num_accepted > 0


@pytest.mark.model
def test_refusals(loaded: Any, drafts: Any, tiny_models: Any, tiny_chat_dir: Path, tmp_path: Path) -> None:
    s = stepper(loaded)  # no draft model
    with pytest.raises(InvalidRequestError, match="method 'draft' needs a draft model"):
        s.add(Request([5, 6], SamplingParams(speculative={"method": "draft"})))
    s = stepper(loaded, draft_model=str(drafts["same"]))
    with pytest.raises(InvalidRequestError, match="is not this engine's draft model"):
        s.add(Request([5, 6], SamplingParams(speculative={"model": "elsewhere"})))
    with pytest.raises(InvalidRequestError, match="p_min: must be a number in"):
        SamplingParams(speculative={"method": "draft", "p_min": 1.5})
    with pytest.raises(InvalidRequestError, match="goes with method 'draft'"):
        SpeculativeConfig(method="ngram", model="x")
    assert not s.has_work
    # Another vocabulary size (no tokenizers on either side: ids only).
    config = tiny_config("llama")
    config.vocab_size = 96
    hf_class("llama")(config).save_pretrained(str(tmp_path / "vocab96"))
    with pytest.raises(ConfigError, match="vocabulary of 96 tokens, the target's has 128"):
        stepper(loaded, draft_model=str(tmp_path / "vocab96"))
    # A target with a tokenizer, a draft without one; then a draft whose tokenizer has one more token.
    with pytest.raises(ConfigError, match="the draft model has no tokenizer"):
        LLMEngine(EngineConfig(model=str(tiny_chat_dir), dtype="float32", kv_cache_tokens=256,
                               draft_model=str(drafts["same"])))
    other = tmp_path / "other-tokenizer"
    hf = hf_class("llama").from_pretrained(str(tiny_chat_dir))
    hf.save_pretrained(str(other))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_chat_dir))
    tok.add_tokens(["<choral-extra>"])
    tok.save_pretrained(str(other))
    with pytest.raises(ConfigError, match="its tokenizer differs from the target's"):
        LLMEngine(EngineConfig(model=str(tiny_chat_dir), dtype="float32", kv_cache_tokens=256,
                               draft_model=str(other)))


@pytest.mark.model
def test_llm_speculative_config_loads_the_draft(tiny_chat_dir: Path) -> None:
    """vLLM's form, speculative_config={"model": ..., "num_speculative_tokens": ...}, loads the
    draft; greedy chat answers equal plain decoding's, and the metrics count the proposals."""
    chats = [[{"role": "user", "content": "Say something."}], [{"role": "user", "content": "Count."}]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(tiny_chat_dir), dtype="float32", kv_cache_tokens=1024) as plain:
        want = [o.outputs[0].token_ids for o in plain.chat(chats, greedy)]
    spec = {"model": str(tiny_chat_dir), "num_speculative_tokens": 3, "p_min": 0.0}
    with LLM(str(tiny_chat_dir), dtype="float32", kv_cache_tokens=1024, speculative_config=spec) as llm:
        assert llm.engine.config.draft_model == str(tiny_chat_dir)
        outs = llm.chat(chats, greedy)
        assert [o.outputs[0].token_ids for o in outs] == want
        assert all(o.metrics is not None and o.metrics.num_accepted_tokens > 0 for o in outs)
    with pytest.raises(ConfigError, match="differ; give one"):
        LLM(str(tiny_chat_dir), speculative_config=spec, draft_model="elsewhere")


def test_serve_draft_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from choral.cli import main

    assert main(["serve", "--speculative", "draft"]) == 2
    assert "--speculative draft needs --draft-model PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--draft-weights", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.model
def test_bundled_model_with_its_quantized_copy_as_draft() -> None:
    """The bundled model dequantized to fp32 as the target and its own GGUF weights run natively
    as the draft (a quantized copy of the target): the greedy text of an editing prompt and an
    open question equals plain decoding's, and most proposals are accepted."""
    passage = ("The lighthouse stood on a narrow spit of rock at the edge of the bay. Every evening the keeper "
               "climbed the steps to light the lamp.")
    chats = [[{"role": "user", "content": f"Repeat the following passage exactly:\n\n{passage}"}],
             [{"role": "user", "content": "Why is the sky blue?"}]]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    with LLM("smollm2-135m-instruct", dtype="float32", weights="dequantize", kv_cache_tokens=2048,
             max_model_len=1024, draft_model="smollm2-135m-instruct", draft_weights="native") as llm:
        assert llm.engine.core.draft is not None and llm.engine.core.draft.runner.model.native
        plain = llm.chat(chats, greedy)
        drafted = llm.chat(chats, SamplingParams(temperature=0, max_tokens=40,
                                                 speculative={"method": "draft", "k": 4, "adaptive": False}))
        assert [o.outputs[0].text for o in drafted] == [o.outputs[0].text for o in plain]
        metrics = [o.metrics for o in drafted]
        assert all(m is not None for m in metrics)
        proposed = sum(m.num_draft_tokens for m in metrics)  # type: ignore[union-attr]
        accepted = sum(m.num_accepted_tokens for m in metrics)  # type: ignore[union-attr]
        assert proposed > 0 and accepted > 0.7 * proposed
        assert llm.engine.core.draft.kv.pool.num_used_blocks == 0
