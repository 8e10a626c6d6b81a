"""ChatSession on the bundled SmolLM2 (fp32): answers equal LLM.generate on the same rendered
history, each turn feeds only its new tokens, streaming, aborts that keep the partial answer,
and two asyncio sessions decoded in the same batches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from choral import (
    BatchedExecutor,
    CancelToken,
    ChatSession,
    FinishReason,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
)

SYSTEM = "You are a helpful assistant."
GREEDY = SamplingParams(temperature=0)


@pytest.fixture()
def executor(smollm_fp32) -> Iterator[BatchedExecutor]:  # type: ignore[no-untyped-def]
    ex = BatchedExecutor(smollm_fp32)  # shares the LLM's weights and KV cache
    yield ex
    ex.check_invariants()
    ex.close()
    pool = ex.engine.pool
    assert pool.num_free_blocks == pool.num_blocks


def generate_reply(llm: Any, messages: list[dict[str, str]], max_tokens: int) -> str:
    out = llm.generate([messages], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    return str(out.outputs[0].text)


def test_two_turns_equal_generate_and_feed_only_new_tokens(executor: BatchedExecutor, smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    session = ChatSession(executor.create(), system_prompt=SYSTEM)
    chunks: list[str] = []
    first = session.prompt("What is the capital of France?", max_tokens=12, on_text=chunks.append)
    assert "".join(chunks) == first and "Paris" in first
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
    assert first == generate_reply(smollm_fp32, messages, 12)

    held = session.conversation.token_count
    fed: list[int] = []
    real_prompt = session.conversation.prompt

    def spy(prompt: Any, *args: Any, **kwargs: Any) -> None:
        fed.append(1 if isinstance(prompt, int) else len(prompt))
        real_prompt(prompt, *args, **kwargs)

    session.conversation.prompt = spy  # type: ignore[method-assign]
    second = session.prompt("And of Italy?", max_tokens=12)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    assert second == generate_reply(smollm_fp32, messages, 12)
    full = smollm_fp32.tokenizer.apply_chat_template(messages)
    assert fed[0] < 20 < held < len(full)  # the history stayed in the KV cache
    assert session.history[-1] == {"role": "assistant", "content": second}
    last = session.last_response
    assert last is not None and last.finish_reason in (FinishReason.END_ID, FinishReason.LENGTH)


def test_cancel_token_keeps_the_partial_answer(executor: BatchedExecutor) -> None:
    session = ChatSession(executor.create())
    cancel = CancelToken()
    seen: list[str] = []

    def on_text(text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            cancel.cancel()

    answer = session.prompt("Write a long story about a dragon.", max_tokens=40, on_text=on_text, cancel=cancel)
    assert session.last_response is not None and session.last_response.finish_reason is FinishReason.CANCELLED
    assert len(session.last_response.token_ids) == 3 and answer == "".join(seen)
    assert session.history[-1]["content"] == answer
    assert not session.conversation.requires_inference
    assert session.prompt("Thanks!", max_tokens=4)  # the session goes on


def test_gathered_sessions_share_batches_and_answer_like_sync(executor: BatchedExecutor, smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    runner = executor.engine.runner
    sizes: list[int] = []
    real_execute = runner.execute

    def spy(chunks: Any) -> Any:
        sizes.append(len(chunks))
        return real_execute(chunks)

    runner.execute = spy  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, ignore_eos=True)
    a, b = ChatSession(executor.create()), ChatSession(executor.create())

    async def both() -> list[str]:
        return list(await asyncio.gather(
            a.aprompt("What is the capital of France?", max_tokens=8, params=params),
            b.aprompt("List three prime numbers.", max_tokens=8, params=params),
        ))

    answers = asyncio.run(both())
    runner.execute = real_execute  # type: ignore[method-assign]
    assert sizes == [2] * 8  # prefill together, then 7 decodes of both (the 8th token is not fed)
    for question, answer in zip(["What is the capital of France?", "List three prime numbers."], answers,
                                strict=True):
        messages = [{"role": "user", "content": question}]
        out = smollm_fp32.generate([messages], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
        assert answer == out.outputs[0].text


def test_asyncio_cancellation_keeps_the_partial_answer(executor: BatchedExecutor) -> None:
    session = ChatSession(executor.create())
    seen: list[str] = []

    async def main() -> None:
        task = asyncio.ensure_future(session.aprompt("Tell me about the sea.", max_tokens=40,
                                                     on_text=seen.append,
                                                     params=SamplingParams(temperature=0, ignore_eos=True)))
        while len(seen) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    response = session.last_response
    assert response is not None and response.finish_reason is FinishReason.CANCELLED
    assert 3 <= len(response.token_ids) < 40 and response.text.startswith("".join(seen[:3]))
    assert not session.conversation.requires_inference
    assert session.history[-1]["content"] == response.text
    assert asyncio.run(session.aprompt("Thanks!", max_tokens=4))


def test_bad_chat_input(executor: BatchedExecutor) -> None:
    session = ChatSession(executor.create())
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        session.prompt("hi", max_tokens=0)
    with pytest.raises(InvalidRequestError, match="str"):
        session.prompt(["hi"])  # type: ignore[arg-type]
    assert session.conversation.token_count == 0 and session.history == []


def test_chat_needs_a_chat_template(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from tests.test_conversations import make_executor

    with make_executor(tiny_models["llama"][0]) as executor:  # no tokenizer at all
        with pytest.raises(InvalidRequestError, match="chat template"):
            ChatSession(executor.create())


def test_long_chat_drops_the_oldest_exchanges(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    with BatchedExecutor(smollm_fp32, max_model_len=96, kv_cache_tokens=640) as executor:
        session = ChatSession(executor.create(), system_prompt="Be brief.")
        questions = ["Name a colour.", "Name a fruit.", "Name an animal.", "Name a city.", "Name a tree."]
        for q in questions:
            session.prompt(q, max_tokens=24)
            assert session.conversation.token_count <= 96
            assert session.last_response is not None and session.last_response.finish_reason is not FinishReason.ERROR
        history = session.history
        assert history[0] == {"role": "system", "content": "Be brief."}
        assert history[-2] == {"role": "user", "content": "Name a tree."}
        assert len(history) < 1 + 2 * len(questions)  # older exchanges were dropped
        executor.check_invariants()
    with pytest.raises(PromptTooLongError):
        with BatchedExecutor(smollm_fp32, max_model_len=64, kv_cache_tokens=640) as executor:
            ChatSession(executor.create()).prompt("word " * 80, max_tokens=4)


def test_min_tokens_holds_the_end_only_until_reached(executor: BatchedExecutor, smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Say hi."}]
    reply = smollm_fp32.generate([messages], SamplingParams(temperature=0, max_tokens=60))[0].outputs[0]
    assert reply.finish_reason == "stop" and len(reply.token_ids) < 58  # greedy ends early by itself
    session = ChatSession(executor.create())
    answer = session.prompt("Say hi.", max_tokens=60, params=SamplingParams(temperature=0, min_tokens=2))
    assert session.last_response is not None and session.last_response.finish_reason is FinishReason.END_ID
    assert answer == reply.text  # min_tokens below the natural length changes nothing


def test_stop_string_cuts_the_answer_and_is_never_streamed(executor: BatchedExecutor) -> None:
    question = "What is the capital of France?"
    full = ChatSession(executor.create()).prompt(question, max_tokens=16)
    word = full.split()[2]  # a word in the middle of the greedy answer
    session = ChatSession(executor.create())
    chunks: list[str] = []
    answer = session.prompt(question, max_tokens=16, params=SamplingParams(temperature=0, stop=(word,)),
                            on_text=chunks.append)
    assert answer == full[: full.index(word)] == "".join(chunks)
    last = session.last_response
    assert last is not None and last.finish_reason is FinishReason.STOP_WORDS and last.stop_reason == word
    assert session.history[-1] == {"role": "assistant", "content": answer}


def test_answer_ends_when_the_context_is_full(smollm_fp32) -> None:  # type: ignore[no-untyped-def]
    with BatchedExecutor(smollm_fp32, max_model_len=48, kv_cache_tokens=640) as executor:
        session = ChatSession(executor.create())
        prompt_tokens = len(session.tokenizer.apply_chat_template([{"role": "user", "content": "Count to fifty."}]))
        session.prompt("Count to fifty.", max_tokens=200, params=SamplingParams(temperature=0, ignore_eos=True))
        last = session.last_response
        assert last is not None and last.finish_reason is FinishReason.LENGTH and last.stop_reason is None
        # The conversation's KV is full; the answer's last token was sampled but never fed.
        assert session.conversation.token_count == 48
        assert len(last.token_ids) == 48 + 1 - prompt_tokens


def test_penalties_change_a_repetitive_answer(executor: BatchedExecutor) -> None:
    question = "Write the word hello twenty times, separated by spaces."

    def answer(**penalty: float) -> str:
        params = SamplingParams(temperature=0, **penalty)
        return ChatSession(executor.create()).prompt(question, max_tokens=24, params=params)

    free = answer()
    words = [w.strip(",.!").lower() for w in free.split()]
    assert len(words) >= 3 and set(words) == {"hello"}, free  # greedy repeats itself
    assert answer(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0) == free
    for knob in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        assert answer(**{knob: 1.5}) != free, knob


def test_penalties_count_the_current_answer_as_output(executor: BatchedExecutor) -> None:
    session = ChatSession(executor.create())
    session.prompt("Say hi.", max_tokens=3)
    seen: list[int | None] = []
    real_sample = session.conversation.sample

    def spy(*args: Any, num_output_tokens: int | None = None, **kwargs: Any) -> int:
        seen.append(num_output_tokens)
        return real_sample(*args, num_output_tokens=num_output_tokens, **kwargs)

    session.conversation.sample = spy  # type: ignore[method-assign]
    session.prompt("And again.", max_tokens=5, params=SamplingParams(temperature=0, ignore_eos=True))
    assert seen == [0, 1, 2, 3, 4]  # the earlier turns are this answer's prompt
