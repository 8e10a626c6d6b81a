"""Request validation: every bad value is refused at enqueue (or construction) with choral's own
InvalidRequestError naming the field, nothing is queued or allocated, and the executor keeps
serving; stop strings before ``min_tokens`` do not count.

Text and chat run on a tiny random model that carries SmolLM2's tokenizer and chat template
(loading SmolLM2's weights would take most of this file's time budget)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from choral import BatchedExecutor, SamplingParams
from choral.errors import InvalidRequestError
from choral.executor import Completion, Executor, FinishReason, Request, SequenceOutput, Timing
from choral.finish import Finisher, IncrementalDetokenizer, StopConditions
from choral.loader.resolve import resolve_model_path
from choral.outputs import request_output
from choral.sampling.params import MAX_SEED
from choral.tokenizer import Tokenizer
from tests.conftest import hf_class, tiny_config

VOCAB = 128  # the tiny models' vocabulary
PROMPT = [5, 6, 7]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Iterator[Executor]:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    ex = Executor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=128)
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"), [])
    assert tok is not None and tok.has_chat_template
    return tok


@pytest.fixture(scope="module")
def chat_ex(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Iterator[Executor]:
    """A tiny random llama with SmolLM2's vocabulary, tokenizer and chat template."""
    config = tiny_config("llama")
    config.vocab_size = tokenizer.vocab_size
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_ids[0]
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-chat")
    hf_class("llama")(config).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.hf_tokenizer.save_pretrained(str(directory))
    ex = Executor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=256)
    yield ex
    ex.shutdown()


def assert_rejected(ex: Executor, request: Callable[[], Request], field: str,
                    error: type[Exception] = InvalidRequestError) -> None:
    """``request()`` (built inside, as construction may be what raises) is refused with exactly
    ``error`` naming ``field``; nothing is queued or allocated and the executor still serves."""
    pool = ex.kv.pool
    free, queued = pool.num_free_blocks, ex.num_queued_not_scheduled
    with pytest.raises(Exception) as info:
        ex.enqueue(request())
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    # (A request in flight may be scheduled meanwhile: the queue can only shrink.)
    assert ex.num_responses_ready() == 0 and ex.num_queued_not_scheduled <= queued
    if queued == 0:
        assert pool.num_free_blocks == free
    assert ex.is_running


def assert_serves(ex: Executor, prompt: Any = PROMPT) -> int:
    """A good request still runs; returns its id."""
    done = ex.submit(Request(prompt, GREEDY), timeout=60)
    assert done.finish_reason is FinishReason.LENGTH and len(done.token_ids) == 4
    return done.request_id


# ---- token ids against the vocabulary ------------------------------------------------------------
@pytest.mark.parametrize(("options", "field"), [
    (dict(bad_words=[[500]]), "bad_words"),
    (dict(bad_words=[[5, VOCAB]]), "bad_words"),
    (dict(logit_bias={500: 5.0}), "logit_bias"),
    (dict(logit_bias={VOCAB: -math.inf}), "logit_bias"),
    (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
])
def test_sampling_token_ids_outside_the_vocabulary_are_refused(tiny: Executor, options: dict[str, Any],
                                                               field: str) -> None:
    # A request in flight must not be disturbed by the refusals (the loop used to die on bad_words).
    other = tiny.submit_async(Request(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
    assert_rejected(tiny, lambda: Request(PROMPT, SamplingParams(temperature=0, max_tokens=4, **options)), field)
    done = tiny.poll(other, timeout=60)
    assert done is not None and len(done.token_ids) == 40
    assert assert_serves(tiny) == other + 1  # the refused request took no id
    assert tiny.kv.pool.num_used_blocks == 0
    tiny.kv.pool.check_invariants()


@pytest.mark.parametrize(("options", "field"), [
    (dict(stop_words=[[VOCAB]]), "stop_words"),
    (dict(end_id=VOCAB), "end_id"),
])
def test_request_token_ids_outside_the_vocabulary_are_refused(tiny: Executor, options: dict[str, Any],
                                                              field: str) -> None:
    assert_rejected(tiny, lambda: Request(PROMPT, GREEDY, **options), field)


def test_token_ids_at_the_vocabulary_edge_are_used(tiny: Executor) -> None:
    first = tiny.submit(Request(PROMPT, GREEDY)).token_ids[0]
    banned = tiny.submit(Request(PROMPT, SamplingParams(temperature=0, max_tokens=4, bad_words=[[first], [VOCAB - 1]])))
    assert first not in banned.token_ids and VOCAB - 1 not in banned.token_ids
    pushed = tiny.submit(Request(PROMPT, SamplingParams(temperature=0, max_tokens=3, logit_bias={VOCAB - 1: 1e4})))
    assert pushed.token_ids == [VOCAB - 1] * 3


def test_conversation_sample_checks_token_ids_and_changes_nothing(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    with BatchedExecutor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=256,
                         max_model_len=64) as ex:
        seeded = SamplingParams(temperature=1.0, seed=7)
        reference, conversation = ex.create(), ex.create()
        for c in (reference, conversation):
            c.prompt(PROMPT)
        ex.infer()
        expected = [reference.sample(seeded), reference.sample(seeded)]
        got = [conversation.sample(seeded)]
        for options, field in ((dict(bad_words=[[500]]), "bad_words"), (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
                               (dict(stop_token_ids=[VOCAB], min_tokens=1), "stop_token_ids")):
            with pytest.raises(InvalidRequestError, match=f"^{field}: token id"):
                conversation.sample(SamplingParams(temperature=1.0, seed=8, **options))
        # The refused calls (with another seed) left the seeded generator where it was.
        got.append(conversation.sample(seeded))
        assert got == expected and conversation.token_count == len(PROMPT)
        ex.check_invariants()


# ---- seed ----------------------------------------------------------------------------------------
def test_max_seed_is_what_torch_generators_take() -> None:
    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        torch.Generator().manual_seed(MAX_SEED + 1)


@pytest.mark.parametrize(("options", "ok"), [
    (dict(seed=MAX_SEED), True),
    (dict(seed=MAX_SEED + 1), False),
    (dict(seed=MAX_SEED - 1, n=2), True),
    (dict(seed=MAX_SEED, n=2), False),
    (dict(seed=MAX_SEED - 3, n=1, best_of=4), True),
    (dict(seed=MAX_SEED - 2, n=1, best_of=4), False),
    (dict(seed=MAX_SEED, beam_width=3, temperature=0.0), True),  # beams draw nothing at random
    (dict(seed=-1), False),
    (dict(seed=True), False),
])
def test_seed_and_every_sample_seed_must_fit_a_generator(options: dict[str, Any], ok: bool) -> None:
    if ok:
        SamplingParams(**options)
    else:
        with pytest.raises(InvalidRequestError, match="^seed: "):
            SamplingParams(**options)


def test_request_n_rechecks_the_seed_and_large_seeds_run(tiny: Executor) -> None:
    top = SamplingParams(temperature=1.0, max_tokens=4, seed=MAX_SEED)
    assert_rejected(tiny, lambda: Request(PROMPT, top, n=2), "seed")
    done = tiny.submit(Request(PROMPT, SamplingParams(temperature=1.0, max_tokens=4, seed=MAX_SEED - 1), n=2),
                       timeout=60)
    assert [len(out.token_ids) for out in done.outputs] == [4, 4]
    assert_serves(tiny)


# ---- Request fields --------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "field"), [
    (dict(stop_words=[5]), "stop_words"),
    (dict(stop_words=None), "stop_words"),
    (dict(stop_words=5), "stop_words"),
    (dict(stop_words=[[]]), "stop_words"),
    (dict(stop_words=[[1, -1]]), "stop_words"),
    (dict(stop_words=[[1, True]]), "stop_words"),
    (dict(end_id=True), "end_id"),
    (dict(end_id=np.True_), "end_id"),
    (dict(end_id=-1), "end_id"),
    (dict(end_id=2.0), "end_id"),
    (dict(allotted_time=float("nan")), "allotted_time"),
    (dict(allotted_time=math.inf), "allotted_time"),
    (dict(allotted_time=0), "allotted_time"),
    (dict(allotted_time=True), "allotted_time"),
    (dict(priority=float("nan")), "priority"),
    (dict(priority=math.inf), "priority"),
    (dict(priority=-math.inf), "priority"),
    (dict(priority=True), "priority"),
    (dict(priority="high"), "priority"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=np.True_), "max_tokens"),
    (dict(max_tokens=2.0), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=True), "n"),
    (dict(n=np.int64(65)), "n"),
])
def test_bad_request_fields_are_refused_at_construction(options: dict[str, Any], field: str) -> None:
    with pytest.raises(Exception) as info:
        Request(PROMPT, GREEDY, **options)
    assert type(info.value) is InvalidRequestError
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    if field == "allotted_time" and options[field] == math.inf:
        assert "None for no limit" in str(info.value)


def test_numpy_numbers_are_accepted_as_plain_numbers(tiny: Executor) -> None:
    request = Request(PROMPT, SamplingParams(temperature=np.float32(0.0), max_tokens=np.int64(9), top_k=np.int32(5),
                                             stop_token_ids=np.array([9, 10]), seed=np.uint64(3)),
                      max_tokens=np.int64(3), n=np.int32(1), priority=np.int64(2), end_id=np.int64(2),
                      allotted_time=np.float32(30.0), stop_words=[[np.int64(1), 2]])
    for value in (request.max_tokens, request.n, request.end_id, request.sampling.max_tokens, request.sampling.top_k,
                  request.sampling.seed, *request.sampling.stop_token_ids, *request.stop_words[0]):
        assert type(value) is int
    assert type(request.priority) is float and type(request.sampling.temperature) is float
    numpy_prompt = tiny.submit(Request(list(np.array(PROMPT)), GREEDY))
    assert numpy_prompt.token_ids == tiny.submit(Request(PROMPT, GREEDY)).token_ids


@pytest.mark.parametrize(("options", "field"), [
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=None), "stop_token_ids"),
    (dict(stop_token_ids=[1.0]), "stop_token_ids"),
    (dict(stop=5), "stop"),
    (dict(stop=None), "stop"),
    (dict(stop=b"end"), "stop"),
    (dict(stop=["ok", 5]), "stop"),
    (dict(bad_words=5), "bad_words"),
    (dict(bad_words=None), "bad_words"),
    (dict(bad_words=[5]), "bad_words"),
    (dict(bad_words=[[1, np.True_]]), "bad_words"),
    (dict(logits_processors=3), "logits_processors"),
    (dict(logits_processors=None), "logits_processors"),
    (dict(logit_bias=[1]), "logit_bias"),
    (dict(logit_bias={1.5: 1.0}), "logit_bias"),
    (dict(max_tokens=np.True_), "max_tokens"),
    (dict(n=True), "n"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=10**400), "temperature"),
])
def test_bad_sampling_fields_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(Exception) as info:
        SamplingParams(**options)
    assert type(info.value) is InvalidRequestError
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize("prompt", [b"abc", bytearray(b"abc")])
def test_bytes_prompts_are_refused(tiny: Executor, prompt: Any) -> None:
    assert_rejected(tiny, lambda: Request(prompt, GREEDY), "prompt")


# ---- text and chat prompts (SmolLM2's tokenizer and template) -------------------------------------
def chat(messages: list[Any]) -> Callable[[], Request]:
    return lambda: Request(messages, GREEDY)


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(("bad", "field"), [
    ({"role": "user", "content": None}, "messages[1].content"),
    ({"role": "user", "content": 5}, "messages[1].content"),
    ({"role": "user", "content": [{"type": "text", "text": "hi"}]}, "messages[1].content"),
    ({"role": "user", "content": {"text": "hi"}}, "messages[1].content"),
    ({"role": None, "content": "hi"}, "messages[1].role"),
    ({"role": "", "content": "hi"}, "messages[1].role"),
    ({"role": "user"}, "messages[1]"),
    ({"role": "user", "content": "a\udc80b"}, "messages[1].content"),
])
def test_bad_chat_messages_are_refused(chat_ex: Executor, bad: dict[str, Any], field: str) -> None:
    assert_rejected(chat_ex, chat([{"role": "system", "content": "Be brief."}, bad]), field)


def test_bad_text_is_refused_and_good_text_still_runs(chat_ex: Executor) -> None:
    ex = chat_ex
    assert_rejected(ex, lambda: Request("a\udc80b", GREEDY), "prompt")
    words = SamplingParams(temperature=0, max_tokens=4, bad_words=["ok", "x\ud800"])
    assert_rejected(ex, lambda: Request("Hello", words), "bad_words")
    assert_serves(ex, [USER])
    assert_serves(ex, "Hello")


# ---- stop strings and min_tokens -----------------------------------------------------------------
STOP_TEXT = "one two STOP three four STOP five six"


def feed(tokenizer: Tokenizer, tokens: list[int], stop: tuple[str, ...],
         min_tokens: int) -> tuple[IncrementalDetokenizer, str]:
    """Feed tokens until a stop string ends the sequence (as the executor does); returns the
    detokenizer and the text it streamed."""
    detok = IncrementalDetokenizer(tokenizer, stop, True, min_tokens=min_tokens)
    streamed = []
    for token in tokens:
        detok.add(token)
        if detok.stopped_on is not None:
            assert len(detok.tokens) >= min_tokens  # so the Finisher's min_tokens gate agrees
            break
        streamed.append(detok.delta(final=False))
    streamed.append(detok.flush())
    return detok, "".join(streamed)


def completing(tokenizer: Tokenizer, tokens: list[int], stop: str) -> list[int]:
    """The (1-based) tokens whose text completes an occurrence of ``stop``."""
    def count(k: int) -> int:
        return tokenizer.decode(tokens[:k]).count(stop)

    return [k for k in range(1, len(tokens) + 1) if count(k) > count(k - 1)]


def test_detokenizer_counts_stop_strings_only_from_min_tokens(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode(STOP_TEXT, add_special_tokens=False)
    assert tokenizer.decode(tokens) == STOP_TEXT
    first, second = completing(tokenizer, tokens, "STOP")
    for min_tokens, kept in ((0, "one two "), (first, "one two "), (first + 1, "one two STOP three four "),
                             (second, "one two STOP three four "), (second + 1, STOP_TEXT)):
        detok, streamed = feed(tokenizer, tokens, ("STOP",), min_tokens)
        assert detok.text == streamed == kept, min_tokens
        assert detok.stopped_on == (None if kept == STOP_TEXT else "STOP")
    # A match may begin before the min_tokens-th token as long as it ends in that token's text or later.
    detok, _ = feed(tokenizer, tokens, ("two STOP",), first)
    assert detok.text == "one " and detok.stopped_on == "two STOP"


def test_llm_outputs_cut_only_at_stop_strings_after_min_tokens(tokenizer: Tokenizer) -> None:
    """LLM.generate's text and stop_reason are the Finisher's (the executor's), unchanged."""
    tokens = tokenizer.encode(STOP_TEXT, add_special_tokens=False)
    first, second = completing(tokenizer, tokens, "STOP")
    for min_tokens, kept in ((0, "one two "), (first, "one two "), (first + 1, "one two STOP three four ")):
        params = SamplingParams(temperature=0, max_tokens=30, min_tokens=min_tokens, stop=("STOP",))
        finisher = Finisher(StopConditions.from_params(params, tokenizer.eos_token_ids), tokenizer)
        reasons = [finisher.add(t) for t in tokens[:second]]
        assert reasons.index(FinishReason.STOP_WORDS) == (first if min_tokens <= first else second) - 1
        finisher.flush()
        seq = SequenceOutput(0, finisher.token_ids, finisher.text, finisher.reason, None,
                             stop_reason=finisher.stop_reason)
        out = request_output(Completion(0, None, [1], [seq], Timing(0.0), 0), "0", None, params).outputs[0]
        assert (out.text, out.stop_reason, out.finish_reason) == (kept, "STOP", "stop"), min_tokens


def test_incremental_text_equals_a_full_decode(tokenizer: Tokenizer) -> None:
    """The Finisher's text (what LLM.generate, the executor and ChatSession return) is the full
    decode of the tokens, across multi-byte characters, spaces and newlines."""
    text = "Grüße, 世界! 😀 naïve café\n\n  def f(x):\n\treturn x ** 2  # ∑ ok — «fin»"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    finisher = Finisher(StopConditions(), tokenizer)
    streamed = []
    for token in tokens:
        finisher.add(token)
        streamed.append(finisher.delta())
    streamed.append(finisher.flush())
    assert finisher.text == "".join(streamed) == tokenizer.decode(tokens) == text


def test_executor_stop_strings_before_min_tokens_do_not_stop(chat_ex: Executor) -> None:
    tok = chat_ex.engine.tokenizer
    prompt = "Hello there"
    alone = chat_ex.submit(Request(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
    full = tok.decode(alone.token_ids)
    # A character the random model writes at least twice, the first time alone in its token.
    stop, first = next((c, ends[0]) for c in dict.fromkeys(full) if c.isascii() and c.isalnum()
                       if len(ends := completing(tok, alone.token_ids, c)) >= 2 and ends[0] < ends[1])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, min_tokens=first + 1, stop=(stop,))
    done = chat_ex.submit(Request(prompt, params))
    assert done.finish_reason is FinishReason.STOP_WORDS and len(done.token_ids) > first + 1
    text = tok.decode(done.token_ids)
    assert done.text == text[: text.rindex(stop)] and stop in done.text
