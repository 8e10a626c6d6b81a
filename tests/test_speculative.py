"""Speculative decoding in the executor, on a tiny random model: the same tokens as plain decoding
(greedy, and seeded sampling) in mixed batches with chunked prefill, preemption, prefix-cache hits,
n > 1 and stop ids; the target's distribution (chi-square against probabilities computed from the
model); no block leaked by random requests with cancels; one final response per request."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from choral import SamplingParams
from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.executor import Executor, ExecutorConfig, Request, Response
from choral.executor.job import Job
from choral.executor.stepper import Stepper
from choral.finish import FinishReason
from choral.speculative import SpeculativeConfig

NGRAM = SpeculativeConfig(k=4, ngram_min=1, ngram_max=3)
OFF = SpeculativeConfig(method="off")
ENGINE = dict(model="tiny", dtype="float32", block_size=4, max_model_len=96)


@pytest.fixture(scope="module")
def loaded(tiny_models: Any) -> Any:
    directory, _ = tiny_models["llama"]
    return LLMEngine(EngineConfig(**{**ENGINE, "model": str(directory)}, kv_cache_tokens=512)).loaded


def stepper(loaded: Any, config: ExecutorConfig | None = None, **options: Any) -> Stepper:
    opts: dict[str, Any] = dict(ENGINE, kv_cache_tokens=512)
    opts.update(options)
    return Stepper(LLMEngine(EngineConfig(**opts), loaded=loaded), config or ExecutorConfig())


def drain(s: Stepper, limit: int = 5000) -> int:
    """Step until idle; returns the sequences preempted on the way."""
    preempted = 0
    for _ in range(limit):
        if not s.has_work:
            s.check_integrity()
            assert s.kv.usage().num_used_blocks == 0
            return preempted
        preempted += len(s.step().preempted)
    raise AssertionError("still running")


def outputs(jobs: list[Job]) -> list[list[list[int]]]:
    return [[q.output_token_ids for q in j.returned] for j in jobs]


def prompts(seed: int, count: int) -> list[list[int]]:
    """Prompts that repeat themselves (so n-grams match), of mixed lengths, some shared whole
    (prefix-cache hits) or in part."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        motif = [rnd.randrange(3, 120) for _ in range(rnd.randint(2, 6))]
        out.append((motif * 8)[: rnd.randint(5, 40)])
    return out + out[:2]


def test_greedy_same_tokens_with_chunked_prefill_preemption_and_prefix_hits(loaded: Any) -> None:
    ps = prompts(0, 8)
    results = []
    for spec in (OFF, NGRAM):
        # 160 cache tokens for 10 requests of up to 40 + 40: decodes preempt; a 12-token budget
        # chunks the prompts and cuts proposals short.
        s = stepper(loaded, kv_cache_tokens=160, max_num_batched_tokens=12)
        jobs = [s.add(Request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                stop_token_ids=[7 + i], speculative=spec)))
                for i, p in enumerate(ps)]
        preempted = drain(s)
        results.append((outputs(jobs), preempted, s.speculator.num_proposed, s.speculator.num_accepted,
                        s.kv.usage().prefix_hits))
    (plain, _, plain_proposed, _, _), (spec_out, preempted, proposed, accepted, hits) = results
    assert spec_out == plain
    assert plain_proposed == 0 and preempted > 0 and hits > 0
    assert proposed > 0 and accepted > 0


@pytest.mark.parametrize("engine_default", [False, True])
def test_seeded_sampling_same_tokens_with_every_knob(loaded: Any, engine_default: bool) -> None:
    """One draw per generated token from the sequence's own generator: a seeded request gives
    the same tokens with or without speculation (n > 1 samples included)."""
    params = dict(temperature=0.3, top_k=40, top_p=0.95, min_p=0.01, presence_penalty=0.1, frequency_penalty=0.05,
                  repetition_penalty=1.05, logit_bias={5: 2.0, 9: -1.0}, max_tokens=30, ignore_eos=True, n=3,
                  logprobs=2)
    ps = prompts(1, 4)
    got = []
    for spec in (OFF, NGRAM):
        if engine_default:
            s = stepper(loaded, ExecutorConfig(speculative=spec))
            sampling = [SamplingParams(seed=100 + i, **params) for i in range(len(ps))]  # type: ignore[arg-type]
        else:
            s = stepper(loaded)
            sampling = [SamplingParams(seed=100 + i, speculative=spec, **params)  # type: ignore[arg-type]
                        for i in range(len(ps))]
        jobs = [s.add(Request(p, sp)) for p, sp in zip(ps, sampling, strict=True)]
        drain(s)
        logprobs = [[q.output_logprobs for q in j.returned] for j in jobs]
        got.append((outputs(jobs), logprobs, s.speculator.num_accepted))
    assert got[1][0] == got[0][0]
    for a, b in zip(got[0][1], got[1][1], strict=True):  # logprobs from the verified rows: equal to rounding
        for la, lb in zip(a, b, strict=True):
            assert [x[0] for x in la] == pytest.approx([x[0] for x in lb], abs=1e-4)
    assert got[1][2] > 0


def chi_square_p(observed: list[int], expected: list[float]) -> tuple[float, float]:
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    dof = len(observed) - 1
    return stat, float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                               torch.tensor(stat / 2, dtype=torch.float64)))


def chi_square_three_tokens(hf, prompt: list[int], allowed: list[int],  # type: ignore[no-untyped-def]
                            counts: dict[tuple[int, ...], int]) -> tuple[float, float]:
    """Chi-square of drawn (t1, t2, t3) counts over the 27 cells of ``allowed`` against their
    exact probabilities from the HF model after ``prompt``."""
    cells = [(a, b, c) for a in allowed for b in allowed for c in allowed]
    with torch.no_grad():
        batch = torch.tensor([prompt + [a, b] for a, b, _ in cells])
        logits = hf(batch).logits[:, -3:, allowed].double()  # [27, 3, 3]: rows predicting t1, t2, t3
    logp = logits.log_softmax(-1)
    index = {t: i for i, t in enumerate(allowed)}
    total = sum(counts.values())
    expected = [total * float(torch.exp(sum(logp[r, j, index[t]] for j, t in enumerate(cell))))
                for r, cell in enumerate(cells)]
    return chi_square_p([counts.get(c, 0) for c in cells], expected)


def test_sampled_tokens_follow_the_target_distribution(loaded: Any, tiny_models: Any) -> None:
    """(t1, t2, t3) drawn with speculation vs their exact probabilities from the HF model, over
    three allowed tokens (27 cells). The prompt repeats those tokens, so every t2 and t3 is
    drawn while verifying a proposal (t2 at depth 0, t3 at depth 1 once t2 was accepted).
    The engine's sampler seed is fixed, so the run is deterministic: chi-square 34.4 on 26 degrees
    of freedom, p = 0.125 (7,616 of 20,480 proposed tokens accepted); the test asks p > 0.001."""
    allowed = [11, 40, 77]
    prompt = [5, 11, 40, 77, 40, 11, 77, 11, 11, 40]
    s = stepper(loaded, max_num_seqs=256, max_num_batched_tokens=2048, kv_cache_tokens=8192)
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, n=64, allowed_token_ids=allowed,
                            speculative=SpeculativeConfig(k=2, ngram_min=1, ngram_max=1, adaptive=False))
    jobs = [s.add(Request(prompt, params)) for _ in range(320)]  # 20,480 draws of (t1, t2, t3)
    drain(s, limit=100_000)
    counts: dict[tuple[int, ...], int] = {}
    for job in jobs:
        for q in job.returned:
            counts[tuple(q.output_token_ids)] = counts.get(tuple(q.output_token_ids), 0) + 1
    assert s.speculator.num_accepted > 5000  # t3 was verified at depth 1 in most draws
    _, hf = tiny_models["llama"]
    stat, p = chi_square_three_tokens(hf, prompt, allowed, counts)
    assert p > 1e-3, f"chi-square {stat:.1f} on 26 degrees of freedom: p = {p:.2g}"


def test_random_requests_with_cancels_leak_no_block(loaded: Any) -> None:
    rnd = random.Random(7)
    s = stepper(loaded, kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=16)
    pending = prompts(2, 40)
    live: list[Job] = []
    added = 0
    while added < 1000 or s.has_work:
        while added < 1000 and len(live) < 24:
            p = pending[added % len(pending)]
            spec = SpeculativeConfig(k=rnd.randint(1, 6), ngram_min=1, ngram_max=rnd.randint(1, 4),
                                     adaptive=rnd.random() < 0.5)
            temperature = rnd.choice([0.0, 0.8])
            sampling = SamplingParams(temperature=temperature, max_tokens=rnd.randint(1, 24),
                                      n=1 if temperature == 0 else rnd.choice([1, 2]), ignore_eos=True,
                                      speculative=spec)
            live.append(s.add(Request(p, sampling)))
            added += 1
        if rnd.random() < 0.15:
            victim = rnd.choice(live)
            with s.core.lock:
                if not victim.ended:
                    s.responder.end_job(victim, FinishReason.CANCELLED)
        s.step()
        live = [j for j in live if not j.ended]
        if rnd.random() < 0.05:
            s.check_integrity()
    drain(s)
    assert s.speculator.num_accepted > 0


def test_executor_streams_one_final_response_each_with_stats(loaded: Any) -> None:
    engine = LLMEngine(EngineConfig(**ENGINE, kv_cache_tokens=512), loaded=loaded)
    ps = prompts(3, 6)
    with Executor(engine, ExecutorConfig()) as plain:
        expected = [plain.submit(Request(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))).token_ids
                    for p in ps]
    engine = LLMEngine(EngineConfig(**ENGINE, kv_cache_tokens=512), loaded=loaded)
    with Executor(engine, ExecutorConfig(speculative=NGRAM)) as ex:
        responses: dict[int, list[Response]] = {}
        ids = [ex.enqueue(Request(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), streaming=True))
               for p in ps]
        finals = 0
        while finals < len(ids):
            for r in ex.await_responses(timeout=30):
                responses.setdefault(r.request_id, []).append(r)
                finals += r.result is not None and r.result.is_final
        stats = ex.iteration_stats
        aggregate = ex.aggregate
    for rid, want in zip(ids, expected, strict=True):
        got = responses[rid]
        assert [r.result is not None and r.result.is_final for r in got].count(True) == 1 and got[-1].result
        assert [t for r in got if r.result for t in r.result.output_token_ids] == want
        last = got[-1].result
        assert 0 <= last.num_accepted_tokens <= last.num_proposed_tokens
    drafted = sum(s.num_draft_tokens for s in stats)
    accepted = sum(s.num_accepted_tokens for s in stats)
    assert drafted > 0 and accepted > 0
    assert aggregate.total_draft_tokens == drafted and aggregate.total_accepted_tokens == accepted
    assert sum(responses[i][-1].result.num_proposed_tokens for i in ids) == drafted  # type: ignore[union-attr]


PASSAGE = ("The lighthouse stood on a narrow spit of rock at the edge of the bay. Every evening the keeper "
           "climbed the steps to light the lamp, and every morning he climbed them again to put it out.")


def test_bundled_model_editing_prompt_same_text_with_stop_strings(smollm_fp32: Any) -> None:
    """The bundled model, dequantized fp32 (batch invariant): an editing prompt whose answer
    repeats the passage, greedy, with stop strings and n > 1 seeded samples next to it; the
    same text with speculation on and off, and most proposals accepted."""
    llm = smollm_fp32
    messages = [{"role": "user", "content": f"Repeat the following passage exactly:\n\n{PASSAGE}"}]
    runs = []
    for spec in (OFF, SpeculativeConfig(k=4)):
        greedy = SamplingParams(temperature=0, max_tokens=60, stop=["morning"], speculative=spec)
        sampled = SamplingParams(temperature=0.5, seed=3, n=2, max_tokens=40, speculative=spec)
        outs = llm.generate([messages, messages], [greedy, sampled], use_tqdm=False)
        runs.append(outs)
    (plain_g, plain_s), (spec_g, spec_s) = runs
    assert spec_g.outputs[0].text == plain_g.outputs[0].text
    assert spec_g.outputs[0].finish_reason == plain_g.outputs[0].finish_reason == "stop"
    assert [o.token_ids for o in spec_s.outputs] == [o.token_ids for o in plain_s.outputs]
    metrics = spec_g.metrics
    assert metrics is not None and metrics.num_draft_tokens > 0
    assert metrics.num_accepted_tokens >= metrics.num_draft_tokens // 2
    assert plain_g.metrics is not None and plain_g.metrics.num_draft_tokens == 0


@pytest.mark.parametrize(("cache_tokens", "speculates"), [(16, False), (20, True)])
def test_a_proposal_never_takes_a_decodes_block(loaded: Any, cache_tokens: int, speculates: bool) -> None:
    """4 blocks of 4: A (7 prompt tokens) holds 2, B (4) holds 1. At the first decode B's token
    needs a new block, and A's proposal would need one too: with one block free the proposal is
    dropped (A decodes plainly, nobody is preempted); with two free it is verified."""
    s = stepper(loaded, kv_cache_tokens=cache_tokens, max_model_len=16)
    s.speculator.propose_all = lambda asks, num_decodes=None: [  # type: ignore[method-assign]
        (seq, state, [3, 4, 5][:limit]) for seq, state, limit in asks if limit > 0]
    spec = SpeculativeConfig(k=3, ngram_min=1, adaptive=False)
    a = s.add(Request([5, 6, 5, 6, 5, 6, 5], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                               speculative=spec)))
    b = s.add(Request([9, 9, 9, 9], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
    s.step()  # both prompts, one token each
    step = s.step()
    assert step.preempted == []
    assert [(int(q.request_id), n) for q, n in step.items] == [(0, 4 if speculates else 1), (1, 1)]
    assert (a.root.seq_id in step.drafts) is speculates
    drain(s)
    assert a.returned and b.returned


def test_conversation_sample_points_to_prompt_speculation(tiny_models: Any) -> None:
    from choral.conversation.batched_executor import BatchedExecutor
    from choral.errors import InvalidRequestError

    directory, _ = tiny_models["llama"]
    ex = BatchedExecutor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=64, max_model_len=32)
    c = ex.create()
    c.prompt([5, 6, 7])
    ex.infer()
    with pytest.raises(InvalidRequestError, match="speculates with prompt"):
        c.sample(SamplingParams(temperature=0, speculative={"method": "ngram"}))
    assert isinstance(c.sample(SamplingParams(temperature=0, speculative={"method": "off"})), int)
