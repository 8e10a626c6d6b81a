"""The Finisher and FinishReason, exactly: stop ids, end ids, stop token sequences, stop strings
split across tokens, multi-byte characters split across tokens, min_tokens, max_tokens and the
context limit, on a byte-level tokenizer made here (each token is a fixed byte string)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from choral.finish import Finisher, FinishReason, StopConditions
from choral.sampling.params import SamplingParams

EOS = 0
SPECIAL = {EOS: b"<eos>"}


class ByteTokenizer:
    """Token i decodes to ``pieces[i]``; text is their bytes joined, decoded with replacement
    (an unfinished character at the end becomes U+FFFD, as with real byte-level tokenizers)."""

    def __init__(self, pieces: Sequence[bytes]):
        self.pieces = {**SPECIAL, **{i + 1: p for i, p in enumerate(pieces)}}

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts = [self.pieces[t] for t in token_ids if not (skip_special_tokens and t in SPECIAL)]
        return b"".join(parts).decode("utf-8", errors="replace")


def tokens_for(*pieces: bytes | str) -> tuple[Any, list[int]]:
    """A tokenizer whose tokens 1..n are ``pieces``, and those ids in order."""
    raw = [p.encode() if isinstance(p, str) else p for p in pieces]
    return ByteTokenizer(raw), list(range(1, len(raw) + 1))


def run(finisher: Finisher, tokens: Sequence[int]) -> tuple[list[FinishReason], list[str]]:
    """Feed tokens until the finisher ends it (or they run out), streaming as the executor does:
    a delta after each token, the flush at the end. Returns the reasons seen and the deltas."""
    reasons, deltas = [], []
    for token in tokens:
        reasons.append(finisher.add(token))
        if finisher.finished:
            break
        deltas.append(finisher.delta())
    deltas.append(finisher.flush())
    return reasons, deltas


def test_stop_string_split_across_tokens_is_cut_and_never_streamed() -> None:
    tok, ids = tokens_for("he", "llo S", "TO", "P now")
    f = Finisher(StopConditions(stop=("STOP",)), tok)
    reasons, deltas = run(f, ids)
    assert reasons == [FinishReason.NOT_FINISHED] * 3 + [FinishReason.STOP_WORDS]
    # "S" and "STO" are held back while they may begin "STOP"; nothing of it is ever streamed.
    assert deltas == ["he", "llo ", "", ""]
    assert f.text == "hello " and f.stop_reason == "STOP" and f.token_ids == ids


def test_held_back_prefix_is_released_when_it_is_not_a_stop_string() -> None:
    tok, ids = tokens_for("a ST", "ORY", "!")
    f = Finisher(StopConditions(stop=("STOP",), max_tokens=3), tok)
    reasons, deltas = run(f, ids)
    assert reasons[-1] is FinishReason.LENGTH and f.stop_reason is None
    assert deltas == ["a ", "STORY", "!"] and f.text == "a STORY!"


def test_earliest_stop_string_wins() -> None:
    tok, ids = tokens_for("xx", "BBAA", "yy")
    f = Finisher(StopConditions(stop=("AA", "BB")), tok)
    run(f, ids)
    assert f.text == "xx" and f.stop_reason == "BB" and f.reason is FinishReason.STOP_WORDS


def test_multibyte_character_split_across_tokens_waits_for_its_last_byte() -> None:
    euro, smile = "€".encode(), "😀".encode()  # 3 and 4 bytes
    tok, ids = tokens_for(b"a", euro[:1], euro[1:], smile[:2], smile[2:3], smile[3:] + b"b")
    f = Finisher(StopConditions(max_tokens=6), tok)
    reasons, deltas = run(f, ids)
    assert reasons[-1] is FinishReason.LENGTH
    assert deltas == ["a", "", "€", "", "", "😀b"] and f.text == "a€😀b"
    assert "\ufffd" not in "".join(deltas)


def test_stop_string_with_a_split_multibyte_character() -> None:
    e = "é".encode()
    tok, ids = tokens_for(b"caf" + e[:1], e[1:] + b"!", b"more")
    f = Finisher(StopConditions(stop=("é!",)), tok)
    reasons, deltas = run(f, ids)
    assert reasons == [FinishReason.NOT_FINISHED, FinishReason.STOP_WORDS]
    assert "".join(deltas) == f.text == "caf" and f.stop_reason == "é!"


def test_unfinished_character_at_the_end_is_flushed_as_replacement() -> None:
    tok, ids = tokens_for(b"ok", "€".encode()[:2])
    f = Finisher(StopConditions(max_tokens=2), tok)
    _, deltas = run(f, ids)
    assert deltas == ["ok", "\ufffd"] and f.text == "ok\ufffd"


def test_end_ids_and_stop_ids() -> None:
    tok, ids = tokens_for("a", "b", "c")
    params = SamplingParams(stop_token_ids=(2,), max_tokens=10)
    eos = Finisher(StopConditions.from_params(params, [EOS]), tok)
    assert [eos.add(t) for t in (1, EOS)] == [FinishReason.NOT_FINISHED, FinishReason.END_ID]
    assert eos.stop_reason == EOS and eos.token_ids == [1, EOS] and eos.text == "a"
    stop = Finisher(StopConditions.from_params(params, [EOS]), tok)
    assert [stop.add(t) for t in (1, 2)] == [FinishReason.NOT_FINISHED, FinishReason.STOP_WORDS]
    assert stop.stop_reason == 2 and stop.text == "ab"  # the executor keeps the stop token's text
    # The request's end_id ends as END_ID even when it is a stop id too (it is checked first).
    end = Finisher(StopConditions.from_params(params, [EOS], end_id=2), tok)
    assert end.add(2) is FinishReason.END_ID and end.stop_reason == 2
    ignored = Finisher(StopConditions.from_params(SamplingParams(ignore_eos=True, max_tokens=10), [EOS]), tok)
    assert ignored.add(EOS) is FinishReason.NOT_FINISHED


def test_decode_end_tokens_false_leaves_the_end_token_out_of_the_text() -> None:
    tok, _ = tokens_for("a", ".")
    conditions = StopConditions(end_ids=frozenset({EOS}), stop_token_ids=frozenset({2}), skip_special_tokens=False)
    for end, kept, dropped in ((EOS, "a<eos>", "a"), (2, "a.", "a")):
        for decode, text in ((True, kept), (False, dropped)):
            f = Finisher(conditions, tok, decode_end_tokens=decode)
            f.add(1)
            f.add(end)
            assert f.flush() == text and f.text == text and f.token_ids == [1, end]


def test_stop_token_sequences() -> None:
    tok, _ = tokens_for("a", "b", "c")
    f = Finisher(StopConditions(stop_sequences=((2, 3),)), tok)
    assert [f.add(t) for t in (2, 1, 2, 3)] == [FinishReason.NOT_FINISHED] * 3 + [FinishReason.STOP_WORDS]
    assert f.stop_reason is None and f.text == "babc"


def test_min_tokens_holds_every_stop_but_length() -> None:
    tok, _ = tokens_for("x", "STOP", "y", "STOP", "z")
    conditions = StopConditions(end_ids=frozenset({EOS}), stop_token_ids=frozenset({3}), stop_sequences=((1,),),
                                stop=("STOP",), min_tokens=3, max_tokens=10)
    f = Finisher(conditions, tok)
    # Tokens 1-2: the stop sequence (1,), the stop string and EOS all come too early.
    assert [f.add(t) for t in (1, 2)] == [FinishReason.NOT_FINISHED] * 2
    assert f.add(3) is FinishReason.STOP_WORDS and f.stop_reason == 3  # the 3rd token may end it
    early_eos = Finisher(conditions, tok)
    assert [early_eos.add(t) for t in (EOS, 5, EOS)] == [FinishReason.NOT_FINISHED] * 2 + [FinishReason.END_ID]


def test_min_tokens_stop_string_must_end_in_the_min_tokens_th_token_or_later() -> None:
    tok, ids = tokens_for("one ", "two ", "ST", "OP three ", "four STOP", " five")
    # The first STOP ends in token 4: min_tokens up to 4 cut there, 5 and 6 at the second one.
    for min_tokens, text, n in ((0, "one two ", 4), (4, "one two ", 4), (5, "one two STOP three four ", 5),
                                (6, "one two STOP three four STOP five", 6)):
        f = Finisher(StopConditions(stop=("STOP",), min_tokens=min_tokens, max_tokens=6), tok)
        _, deltas = run(f, ids)
        assert (f.text, "".join(deltas), len(f.token_ids)) == (text, text, n), min_tokens
        assert f.reason is (FinishReason.LENGTH if min_tokens == 6 else FinishReason.STOP_WORDS)
    # A match may begin before the min_tokens-th token if it ends in it or later.
    f = Finisher(StopConditions(stop=("two ST",), min_tokens=3), tok)
    run(f, ids)
    assert f.text == "one " and f.stop_reason == "two ST" and len(f.token_ids) == 3


def test_max_tokens_and_context_limit_end_exactly_there() -> None:
    tok, ids = tokens_for(*"abcdefgh")
    by_tokens = Finisher(StopConditions(max_tokens=3), tok, num_prompt_tokens=100)
    assert [by_tokens.add(t) for t in ids[:3]] == [FinishReason.NOT_FINISHED] * 2 + [FinishReason.LENGTH]
    # max_model_len counts prompt + output: 5 prompt tokens leave 3 in a context of 8.
    by_context = Finisher(StopConditions(max_tokens=100, max_model_len=8), tok, num_prompt_tokens=5)
    assert [by_context.add(t) for t in ids[:3]] == [FinishReason.NOT_FINISHED] * 2 + [FinishReason.LENGTH]
    assert by_context.text == "abc" and by_context.stop_reason is None
    # min_tokens never holds the length limits.
    held = Finisher(StopConditions(min_tokens=5, max_model_len=3), tok, num_prompt_tokens=1)
    assert [held.add(t) for t in ids[:2]] == [FinishReason.NOT_FINISHED, FinishReason.LENGTH]


def test_stops_outrank_length_on_the_same_token() -> None:
    tok, _ = tokens_for("a", "xSTOP")
    eos_last = Finisher(StopConditions(end_ids=frozenset({EOS}), max_tokens=2), tok)
    assert [eos_last.add(t) for t in (1, EOS)] == [FinishReason.NOT_FINISHED, FinishReason.END_ID]
    string_last = Finisher(StopConditions(stop=("STOP",), max_tokens=2), tok)
    assert [string_last.add(t) for t in (1, 2)] == [FinishReason.NOT_FINISHED, FinishReason.STOP_WORDS]
    assert string_last.text == "ax"


def test_tokens_after_the_end_are_kept_and_change_nothing() -> None:
    """A beam hypothesis is replayed whole: the first end holds, the text stops at a stop string."""
    tok, ids = tokens_for("a", "STOP", "b")
    f = Finisher(StopConditions(end_ids=frozenset({EOS}), stop=("STOP",)), tok)
    assert [f.add(t) for t in (*ids, EOS)] == [FinishReason.NOT_FINISHED] + [FinishReason.STOP_WORDS] * 3
    assert f.token_ids == [*ids, EOS] and f.text == "a" and f.stop_reason == "STOP"


def test_no_tokenizer_still_ends_on_ids_and_length() -> None:
    f = Finisher(StopConditions(end_ids=frozenset({EOS}), stop=("x",), max_tokens=3), None)
    assert [f.add(t) for t in (5, EOS)] == [FinishReason.NOT_FINISHED, FinishReason.END_ID]
    assert f.text == "" and f.flush() == ""
    g = Finisher(StopConditions(max_tokens=2), None)
    assert [g.add(t) for t in (5, 6)] == [FinishReason.NOT_FINISHED, FinishReason.LENGTH]


def test_from_params_takes_every_condition() -> None:
    params = SamplingParams(stop=("a", "b"), stop_token_ids=(7,), min_tokens=2, max_tokens=9,
                            skip_special_tokens=False)
    c = StopConditions.from_params(params, [0, 1], max_model_len=64, end_id=5, stop_sequences=[(3, 4)])
    assert c == StopConditions(end_ids=frozenset({0, 1, 5}), stop_token_ids=frozenset({7}),
                               stop_sequences=((3, 4),), stop=("a", "b"), min_tokens=2, max_tokens=9,
                               max_model_len=64, skip_special_tokens=False)
    assert StopConditions.from_params(params, [0], max_tokens=4).max_tokens == 4
    assert c.token_reason(5) is FinishReason.END_ID and c.token_reason(7) is FinishReason.STOP_WORDS
    assert c.token_reason(3) is None


@pytest.mark.parametrize(("reason", "name"), [
    (FinishReason.NOT_FINISHED, None), (FinishReason.END_ID, "stop"), (FinishReason.STOP_WORDS, "stop"),
    (FinishReason.LENGTH, "length"), (FinishReason.CANCELLED, "abort"), (FinishReason.TIMED_OUT, "abort"),
    (FinishReason.ERROR, "abort"),
])
def test_api_names(reason: FinishReason, name: str | None) -> None:
    assert reason.api_name == name
