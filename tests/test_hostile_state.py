"""Forged saved conversations (issue: "poisoned state"): a state whose checksum anyone can
recompute is checked field by field. Whatever the forgery, ``load`` either refuses it with our own
StateLoadError before allocating anything, or yields a conversation that goes on working; the
other conversations are never affected. An HMAC key detects tampering itself."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from choral import BatchedExecutor, CorruptStateError, IncompatibleStateError, State
from choral.conversation.state import _checksum
from choral.errors import InvalidRequestError, StateLoadError
from tests.test_conversations import PROMPT, greedy, make_executor, run

VOCAB = 128


@pytest.fixture(scope="module")
def bx(tiny_models: Any) -> Iterator[BatchedExecutor]:
    ex = make_executor(tiny_models["llama"][0])
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def saved(bx: BatchedExecutor) -> State:
    c = bx.create()
    c.prompt(PROMPT)
    run(bx)
    state = c.save()
    c.close()
    return state


def unpack(state: State) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    (n,) = struct.unpack("<Q", state.data[:8])
    meta = json.loads(state.data[8 : 8 + n])["__metadata__"]
    return dict(meta), dict(st_load(state.data))


def resign(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> State:
    """What a forger does: recompute the (public) checksum after changing the state."""
    meta = {k: v for k, v in meta.items() if k not in ("checksum", "hmac")}
    meta["checksum"] = _checksum(meta, tensors)
    return State(st_save({k: t.contiguous() for k, t in tensors.items()}, metadata=meta))


def assert_refused(bx: BatchedExecutor, state: State, error: type[Exception] = StateLoadError,
                   **kwargs: Any) -> None:
    used = bx.engine.pool.num_used_blocks
    with pytest.raises(error):
        bx.load(state, **kwargs)
    assert bx.engine.pool.num_used_blocks == used and len(bx.conversations) == 0


# ---- the cases, one by one ---------------------------------------------------------------

def test_out_of_vocabulary_token_ids_are_refused(bx: BatchedExecutor, saved: State) -> None:
    meta, tensors = unpack(saved)
    for bad in (10**9, VOCAB, -1):
        tensors["tokens"] = tensors["tokens"].clone()
        tensors["tokens"][3] = bad
        assert_refused(bx, resign(meta, tensors), CorruptStateError)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.bool, torch.float16, torch.bfloat16])
def test_kv_in_another_dtype_is_refused_not_cast(bx: BatchedExecutor, saved: State, dtype: torch.dtype) -> None:
    meta, tensors = unpack(saved)
    tensors["k.1"] = tensors["k.1"].to(dtype)
    assert_refused(bx, resign(meta, tensors), IncompatibleStateError)


@pytest.mark.parametrize("name", ["k.0", "v.1", "logits"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_kv_and_logits_are_refused(bx: BatchedExecutor, saved: State, name: str, value: float) -> None:
    meta, tensors = unpack(saved)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = value
    assert_refused(bx, resign(meta, tensors), CorruptStateError)


def test_misshaped_logits_and_kv_are_refused(bx: BatchedExecutor, saved: State) -> None:
    meta, tensors = unpack(saved)
    for name, t in (("logits", torch.zeros(1, VOCAB - 1)), ("logits", torch.zeros(len(PROMPT) + 1, VOCAB)),
                    ("logits", torch.zeros(VOCAB)), ("k.0", tensors["k.0"][:, :1]),
                    ("v.0", tensors["v.0"].reshape(len(PROMPT), -1))):
        assert_refused(bx, resign(meta, {**tensors, name: t}))
    assert_refused(bx, resign(meta, {**tensors, "extra": torch.zeros(1)}), CorruptStateError)
    assert_refused(bx, resign(meta, {k: v for k, v in tensors.items() if k != "v.1"}), CorruptStateError)


@pytest.mark.parametrize("header", [
    b"[]", b"{}", b'{"__metadata__": []}', b'{"__metadata__": {"format": 5}}', b"[" * 100_000,
    b'{"__metadata__": {"format": "choral-conversation", "version": "x"}}', b"\xff\xfe", b'"str"',
    b'{"__metadata__": {"format": "choral-conversation"}, "tokens": 5}',
])
def test_malformed_headers_are_corrupt_state_errors(bx: BatchedExecutor, header: bytes) -> None:
    assert_refused(bx, State(struct.pack("<Q", len(header)) + header), CorruptStateError)


@pytest.mark.parametrize("field, value", [
    ("fingerprint", "[1, 2]"), ("fingerprint", "{" * 50_000), ("fingerprint", "nope"), ("version", "-1"),
    ("version", "0"), ("version", "9" * 5000), ("num_tokens", "9" * 30), ("num_tokens", "1e3"),
    ("checksum", "zz"), ("extra", "1"), ("lora", '{"name": "a", "sha256": "00000000000000000000000000000000"}'),
])
def test_forged_metadata_is_refused(bx: BatchedExecutor, saved: State, field: str, value: str) -> None:
    meta, tensors = unpack(saved)
    forged = resign({**meta, field: value}, tensors) if field != "checksum" else \
        State(st_save(tensors, metadata={**meta, field: value}))
    assert_refused(bx, forged)


@pytest.mark.parametrize("value", [
    "nope", "[1]", '{"name": "a"}', '{"name": 5, "sha256": "00000000000000000000000000000000"}',
    '{"name": "", "sha256": "00000000000000000000000000000000"}', '{"name": "a", "sha256": "xyz"}',
    '{"name": "a", "sha256": "00000000000000000000000000000000", "extra": 1}',
])
def test_forged_adapter_metadata_is_refused(bx: BatchedExecutor, saved: State, value: str) -> None:
    """A version 2 state's adapter entry: malformed -> CorruptStateError; well formed but naming
    an adapter this executor has not loaded -> IncompatibleStateError (nothing allocated either way)."""
    meta, tensors = unpack(saved)
    assert_refused(bx, resign({**meta, "version": "2", "lora": value}, tensors), CorruptStateError)


def test_a_state_naming_an_unloaded_adapter_is_refused(bx: BatchedExecutor, saved: State) -> None:
    meta, tensors = unpack(saved)
    value = '{"name": "a", "sha256": "00000000000000000000000000000000"}'
    assert_refused(bx, resign({**meta, "version": "2", "lora": value}, tensors), IncompatibleStateError)


def test_an_hmac_key_detects_tampering(bx: BatchedExecutor) -> None:
    c = bx.create()
    c.prompt(PROMPT)
    run(bx)
    signed = c.save(key=b"secret")
    c.close()
    meta, tensors = unpack(signed)
    loaded = bx.load(signed, key=b"secret")
    loaded.close()
    bx.load(signed).close()  # without a key, the checksum is still checked
    tensors["tokens"] = tensors["tokens"].clone()
    tensors["tokens"][0] = 9  # a valid id: only the HMAC can tell
    forged = resign(meta, tensors)
    assert_refused(bx, forged, CorruptStateError, key=b"secret")
    assert_refused(bx, signed, CorruptStateError, key=b"other")
    assert_refused(bx, resign(meta, unpack(signed)[1]), CorruptStateError, key=b"secret")  # unsigned
    with pytest.raises(InvalidRequestError, match="key"):
        bx.load(signed, key="secret")  # type: ignore[arg-type]


# ---- the property: any forgery is refused or harmless --------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int8, torch.bool]


@st.composite
def forgeries(draw: st.DrawFn, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> State:
    meta, tensors = dict(meta), {k: v.clone() for k, v in tensors.items()}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["meta", "tokens", "dtype", "shape", "values", "drop", "bytes"]))
        name = draw(st.sampled_from(sorted(tensors))) if tensors else "tokens"
        if kind == "meta":
            key = draw(st.sampled_from(["format", "version", "fingerprint", "num_tokens", "checksum", "x"]))
            meta[key] = draw(st.one_of(st.text(max_size=20), st.integers(-5, 10**12).map(str),
                                       st.sampled_from(["{}", "[]", "null", json.dumps(meta.get("fingerprint"))])))
        elif kind == "tokens" and "tokens" in tensors:
            ids = draw(st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(0, VOCAB - 1), min_size=0, max_size=14))
            tensors["tokens"] = torch.tensor(ids, dtype=torch.int64)
        elif kind == "dtype" and name in tensors:
            tensors[name] = tensors[name].to(draw(st.sampled_from(_DTYPES)))
        elif kind == "shape" and name in tensors:
            t = tensors[name].reshape(-1)
            tensors[name] = t[: draw(st.integers(0, t.numel()))]
        elif kind == "values" and name in tensors and tensors[name].is_floating_point():
            t = tensors[name].reshape(-1)
            t[draw(st.integers(0, max(t.numel() - 1, 0)))] = draw(st.floats(allow_nan=True, allow_infinity=True,
                                                                              width=32))
        elif kind == "drop" and name in tensors:
            del tensors[name]
    state = resign(meta, tensors)
    if draw(st.booleans()) and kind == "bytes":
        data = bytearray(state.data)
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        state = State(bytes(data))
    return state


@pytest.fixture(scope="module")
def bystander_reference(bx: BatchedExecutor) -> list[int]:
    c = bx.create()
    c.prompt([9, 8, 7, 6])
    run(bx)
    out = greedy(bx, c, 3)
    c.close()
    return out


def test_any_forged_state_is_refused_or_harmless(bx: BatchedExecutor, saved: State,
                                                 bystander_reference: list[int]) -> None:
    meta, tensors = unpack(saved)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(forgeries(meta, tensors))
    def check(state: State) -> None:
        bystander = bx.create()
        bystander.prompt([9, 8, 7, 6])
        used = bx.engine.pool.num_used_blocks
        try:
            loaded = bx.load(state)
        except StateLoadError:
            assert bx.engine.pool.num_used_blocks == used
            loaded = None
        try:
            run(bx)  # the bystander's prompt (and anything the forged one has pending)
            if loaded is not None:  # accepted: it must go on working like any conversation
                assert all(0 <= t < VOCAB for t in loaded.tokens)
                if loaded.requires_sampling:
                    loaded.prompt(loaded.sample())
                else:
                    loaded.prompt(5)
                run(bx)
                assert torch.isfinite(loaded.logits()).all()
            assert greedy(bx, bystander, 3) == bystander_reference
        finally:
            bystander.close()
            if loaded is not None:
                loaded.close()
        bx.check_invariants()
        assert bx.engine.pool.num_used_blocks == 0

    check()
