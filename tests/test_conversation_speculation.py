"""Speculative decoding in conversations: prompt(token, speculative=...) proposes, the batch's
infer() verifies next to other conversations' tokens, verify() draws the accepted tokens and one
more. Greedy and seeded outputs equal token-by-token sampling; rejected tokens' blocks go back;
every call but verify() and close() is refused while a proposal waits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from choral import SamplingParams
from choral.conversation import BatchedExecutor
from choral.errors import ConversationStateError, InvalidRequestError, RequiresInferenceError

PROMPT = [5, 9, 17, 33, 2, 60, 71, 8, 99, 100, 3]
REPEATS = [5, 11, 40, 77, 40, 11, 77, 11, 40, 77, 40, 11, 77, 11]


def executor(directory: Path, **options: Any) -> BatchedExecutor:
    opts: dict[str, Any] = dict(dtype="float32", block_size=4, kv_cache_tokens=512, max_model_len=128)
    opts.update(options)
    return BatchedExecutor(str(directory), **opts)


def plain_tokens(ex: BatchedExecutor, prompt: list[int], count: int, params: SamplingParams) -> list[int]:
    c = ex.create()
    c.prompt(prompt)
    ex.infer()
    out = []
    for _ in range(count):
        token = c.sample(params)
        out.append(token)
        c.prompt(token)
        ex.infer()
    c.close()
    return out


def speculative_tokens(ex: BatchedExecutor, prompt: list[int], count: int, params: SamplingParams,
                       spec: dict[str, Any], others: int = 0) -> tuple[list[int], list[int]]:
    """``count`` tokens (or a few more: the last verify may go past) through prompt(speculative=)
    and verify(), with ``others`` plain conversations decoding in the same batches. Returns the
    tokens and the numbers of tokens each verify gave."""
    c = ex.create()
    side = [ex.create() for _ in range(others)]
    for s in side:
        s.prompt(PROMPT)
    c.prompt(prompt)
    while ex.batched_token_count:
        ex.infer()
    out = [c.sample(params)]
    per_verify = []
    while len(out) < count:
        c.prompt(out[-1], speculative=spec)
        for s in side:
            s.prompt(s.sample())
        while ex.batched_token_count:
            ex.infer()
        drawn = c.verify(params)
        per_verify.append(len(drawn))
        out.extend(drawn)
    for s in side:
        s.close()
    c.close()
    return out, per_verify


@pytest.mark.model
@pytest.mark.parametrize("seeded", [False, True])
def test_ngram_speculation_gives_the_plain_tokens(tiny_models: Any, seeded: bool) -> None:
    directory, _ = tiny_models["llama"]
    ex = executor(directory)
    params = SamplingParams(temperature=0.05, seed=5) if seeded else SamplingParams(temperature=0)
    want = plain_tokens(ex, REPEATS, 40, params)
    ex2 = executor(directory)
    got, per_verify = speculative_tokens(ex2, REPEATS, 40, params, {"method": "ngram", "k": 4, "ngram_min": 1,
                                                                     "adaptive": False}, others=2)
    assert got[:40] == want
    assert max(per_verify) > 1  # some proposals were accepted: several tokens from one infer()
    assert ex2.engine.pool.num_used_blocks == 0


@pytest.mark.model
def test_draft_model_speculation_gives_the_plain_tokens(tiny_models: Any) -> None:
    """The target as its own draft: every proposal accepted; the draft's blocks go back on close."""
    directory, _ = tiny_models["llama"]
    greedy = SamplingParams(temperature=0)
    want = plain_tokens(executor(directory), PROMPT, 30, greedy)
    ex = executor(directory, draft_model=str(directory))
    got, per_verify = speculative_tokens(ex, PROMPT, 30, greedy, {"method": "draft", "k": 3, "p_min": 0.0,
                                                                   "adaptive": False}, others=1)
    assert got[:30] == want
    assert per_verify[:-1] == [4] * (len(per_verify) - 1)  # 3 accepted + 1 drawn each time
    draft = ex.engine.core.draft
    assert draft is not None and draft.kv.pool.num_used_blocks == 0 and draft.num_sequences == 0


@pytest.mark.model
def test_rejected_tokens_go_and_the_state_is_guarded(tiny_models: Any) -> None:
    directory, hf = tiny_models["llama"]
    ex = executor(directory)
    c = ex.create()
    c.prompt(REPEATS)
    ex.infer()
    before = ex.engine.pool.num_used_blocks
    # Prompting 11 (not the model's pick) makes the n-gram lookup propose what followed 11 before.
    first = 11
    c.prompt(first, speculative={"method": "ngram", "k": 8, "ngram_min": 1, "adaptive": False})
    proposal = c.tokens[len(REPEATS) + 1:]
    assert 1 <= len(proposal) <= 8 and c.requires_inference
    with pytest.raises(RequiresInferenceError):
        c.verify()
    ex.infer()
    assert c.awaits_verification
    for call in (c.sample, c.logits, c.fork, c.save, lambda: c.rewind(1), lambda: c.prompt(3)):
        with pytest.raises(ConversationStateError, match="waits for verify"):
            call()
    with pytest.raises(InvalidRequestError, match="belongs to prompt"):
        c.verify(SamplingParams(speculative={"method": "ngram"}))
    drawn = c.verify()
    accepted = len(drawn) - 1
    assert drawn[:accepted] == proposal[:accepted] and accepted < len(proposal)  # some were rejected
    assert c.tokens == [*REPEATS, first, *proposal[:accepted]] and not c.requires_inference
    # The K/V of the rejected tokens went: blocks as for the kept tokens only.
    assert len(c.block_table) == -(-c.token_count // 4)
    assert ex.engine.pool.num_used_blocks >= before
    # logits() now gives the row the last token was drawn from: the HF model's after the tokens.
    with torch.no_grad():
        ref = hf(torch.tensor([c.tokens])).logits[0, -1]
    assert (c.logits() - ref).abs().max().item() < 1e-4
    assert int(c.logits().argmax()) == drawn[-1]
    assert c.verify() == [drawn[-1]]  # no proposal now: one token, as sample() draws it
    c.prompt(drawn[-1])
    ex.infer()
    c.close()
    assert ex.engine.pool.num_used_blocks == 0


@pytest.mark.model
def test_refusals(tiny_models: Any) -> None:
    directory, _ = tiny_models["llama"]
    ex = executor(directory)
    c = ex.create()
    with pytest.raises(InvalidRequestError, match="needs a draft model"):
        c.prompt([5, 6], speculative={"method": "draft"})
    with pytest.raises(InvalidRequestError, match="all_logits or embeddings"):
        c.prompt([5, 6], speculative="ngram", all_logits=True)
    with pytest.raises(InvalidRequestError, match="unknown option"):
        c.prompt([5, 6], speculative={"kk": 1})
    assert c.token_count == 0 and not c.requires_inference  # nothing changed
    c.prompt([5, 6], speculative={"method": "off"})  # off: a plain prompt
    ex.infer()
    assert isinstance(c.sample(), int)
    with pytest.raises(InvalidRequestError, match="speculates with prompt"):
        c.sample(SamplingParams(speculative={"method": "ngram"}))


@pytest.mark.model
def test_other_model_family(tiny_models: Any) -> None:
    """Qwen3 (q/k norms): the same tokens with and without the n-gram proposals."""
    directory, _ = tiny_models["qwen3"]
    greedy = SamplingParams(temperature=0)
    want = plain_tokens(executor(directory), REPEATS, 24, greedy)
    got, _ = speculative_tokens(executor(directory), REPEATS, 24, greedy, {"method": "ngram", "k": 4,
                                                                           "ngram_min": 1})
    assert got[:24] == want
