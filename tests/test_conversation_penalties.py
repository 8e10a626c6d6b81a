"""Sampling penalties on conversations: presence and frequency penalties count the tokens a
conversation sampled and was fed back (or the last ``num_output_tokens``: a ChatSession's current
answer); the repetition penalty looks at every token (prompt + output, as vLLM)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from choral import BatchedExecutor, Conversation, InvalidRequestError, SamplingParams
from tests.test_conversations import make_executor, run

PROMPT = list(range(3, 19))


@pytest.fixture()
def executor(tiny_models) -> Iterator[BatchedExecutor]:  # type: ignore[no-untyped-def]
    directory: Path = tiny_models["llama"][0]
    with make_executor(directory, kv_cache_tokens=1024) as ex:
        yield ex
        ex.check_invariants()


def rollout(ex: BatchedExecutor, conversation: Conversation, steps: int,
            params: SamplingParams | None = None) -> list[int]:
    """Sample and feed back ``steps`` times; the sampled tokens."""
    out = []
    for _ in range(steps):
        token = conversation.sample(params)
        out.append(token)
        conversation.prompt(token)
        run(ex)
    return out


def continuation(ex: BatchedExecutor, **penalty: float) -> list[int]:
    with ex.create() as conversation:
        conversation.prompt(PROMPT)
        run(ex)
        return rollout(ex, conversation, 16, SamplingParams(temperature=0, **penalty))


def test_each_penalty_changes_a_repetitive_greedy_continuation(executor: BatchedExecutor) -> None:
    free = continuation(executor)
    assert len(set(free)) <= len(free) // 2  # greedy on this model repeats itself
    assert continuation(executor, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0) == free
    for knob in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        changed = continuation(executor, **{knob: 2.0})
        assert changed != free, knob
        assert len(set(changed)) > len(set(free)), knob  # less repetitive


def penalized(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> int:
    """The greedy token under OpenAI's penalties over ``output``: logit - f * count - p * (count > 0)."""
    expected = logits.clone()
    for token in set(output):
        expected[token] -= frequency * output.count(token) + presence
    return int(expected.argmax())


def test_output_is_what_was_sampled_and_fed_back(executor: BatchedExecutor) -> None:
    conversation = executor.create()
    conversation.prompt(PROMPT)
    run(executor)
    sampled = rollout(executor, conversation, 10)
    conversation.prompt(PROMPT[:4])  # the user's turn: prompt, however often it repeats itself
    run(executor)
    logits = conversation.logits().clone()
    every = conversation.tokens
    # The same tokens prompted, not sampled: all prompt, so presence/frequency change nothing.
    prompted = executor.create()
    prompted.prompt(every)
    run(executor)
    prompted_logits = prompted.logits().clone()
    changed = 0
    for presence, frequency in ((0.5, 0.0), (0.0, 0.5), (2.0, 1.0), (2.0, 0.0), (0.0, 2.0), (2.0, 2.0)):
        params = SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency)
        token = conversation.sample(params)
        assert token == penalized(logits, sampled, presence, frequency), (presence, frequency)
        assert prompted.sample(params) == int(prompted_logits.argmax()), (presence, frequency)
        changed += token != int(logits.argmax())
    assert changed  # the sampled tokens were penalized
    prompted.close()
    # The last k tokens instead (ChatSession's current answer): here the user's four.
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert conversation.sample(params, num_output_tokens=4) == penalized(logits, PROMPT[:4], 0.0, 2.0)
    assert conversation.sample(params, num_output_tokens=0) == int(logits.argmax())
    for bad in (-1, len(every) + 1, 1.5, True):
        with pytest.raises(InvalidRequestError, match="num_output_tokens"):
            conversation.sample(params, num_output_tokens=bad)  # type: ignore[arg-type]

    # A fork keeps what its parent sampled; rewound tokens prompted again are prompt.
    child = conversation.fork()
    assert child.sample(params) == conversation.sample(params)
    child.rewind(6)  # the user's four and the last two sampled
    child.prompt(sampled[-2:])
    run(executor)
    child_logits = child.logits().clone()
    assert child.sample(params) == penalized(child_logits, sampled[:-2], 0.0, 2.0)
    child.close()
    conversation.close()


def test_saved_state_tokens_count_as_prompt(executor: BatchedExecutor) -> None:
    conversation = executor.create()
    conversation.prompt(PROMPT)
    run(executor)
    rollout(executor, conversation, 8)
    state = conversation.save()
    loaded = executor.load(state)
    logits = loaded.logits().clone()
    params = SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    assert loaded.sample(params) == int(logits.argmax())
    loaded.close()
    conversation.close()
