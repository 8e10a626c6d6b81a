"""Conversation.save / BatchedExecutor.load: round trips (file and memory) continue exactly like
the uninterrupted run; another model, another dtype, damaged, truncated or newer files are refused
with a clear error and nothing allocated."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from choral import (
    BatchedExecutor,
    CorruptStateError,
    IncompatibleStateError,
    KvCacheExhaustedError,
    State,
    UnsupportedStateVersionError,
)
from tests.test_conversations import PROMPT, greedy, make_executor, run


@pytest.fixture()
def executor(tiny_models):  # type: ignore[no-untyped-def]
    ex = make_executor(tiny_models["llama"][0])
    yield ex
    ex.check_invariants()
    ex.close()
    assert ex.engine.pool.num_free_blocks == ex.engine.pool.num_blocks


def _uninterrupted(executor: BatchedExecutor, steps: int) -> list[int]:
    c = executor.create()
    c.prompt(PROMPT)
    run(executor)
    out = greedy(executor, c, steps)
    c.close()
    return out


def test_save_load_memory_and_file_continue_like_uninterrupted(executor: BatchedExecutor, tmp_path: Path) -> None:
    expected = _uninterrupted(executor, 10)
    c = executor.create()
    c.prompt(PROMPT)
    run(executor)
    first = greedy(executor, c, 4)
    state = c.save()
    assert isinstance(state, State) and state.size > 0
    path = tmp_path / "conv.safetensors"
    c.save(path)
    assert State.from_file(path).size == state.size
    c.close()
    for source in (state, path, str(path)):
        loaded = executor.load(source)
        assert loaded.tokens == [*PROMPT, *first] and loaded.requires_sampling
        assert first + greedy(executor, loaded, 6) == expected
        loaded.close()
    executor.check_invariants()


def test_load_into_an_executor_with_another_block_size(executor: BatchedExecutor, tiny_models) -> None:  # type: ignore[no-untyped-def]
    expected = _uninterrupted(executor, 6)
    c = executor.create()
    c.prompt(PROMPT)
    run(executor)
    state = c.save()
    with make_executor(tiny_models["llama"][0], block_size=16) as other:
        loaded = other.load(state)
        assert greedy(other, loaded, 6) == expected


def test_saved_idle_conversation_needs_a_prompt(executor: BatchedExecutor) -> None:
    c = executor.create()
    c.prompt(PROMPT)
    run(executor)
    c.rewind(1)
    loaded = executor.load(c.save())
    assert not loaded.requires_sampling and not loaded.requires_inference
    loaded.prompt(PROMPT[-1])
    run(executor)
    c.prompt(PROMPT[-1])
    run(executor)
    assert (loaded.logits() - c.logits()).abs().max() <= 1e-4


def test_other_model_and_dtype_are_refused(executor: BatchedExecutor, tiny_models) -> None:  # type: ignore[no-untyped-def]
    c = executor.create()
    c.prompt(PROMPT)
    run(executor)
    state = c.save()
    with make_executor(tiny_models["qwen2"][0]) as other:
        with pytest.raises(IncompatibleStateError, match="different model.*architecture"):
            other.load(state)
        assert other.engine.pool.num_free_blocks == other.engine.pool.num_blocks
    with make_executor(tiny_models["llama"][0], dtype="bfloat16") as other:
        with pytest.raises(IncompatibleStateError, match="dtype: saved 'float32', this model 'bfloat16'"):
            other.load(state)


def _header(data: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def test_damaged_truncated_and_newer_states_are_refused(executor: BatchedExecutor, tmp_path: Path) -> None:
    c = executor.create()
    c.prompt(PROMPT)
    run(executor)
    data = c.save().data
    used = executor.engine.pool.num_used_blocks

    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # inside the tensor data
    with pytest.raises(CorruptStateError, match="checksum"):
        executor.load(State(bytes(flipped)))
    for cut in (4, 100, len(data) - 10):
        with pytest.raises(CorruptStateError, match="truncated|malformed"):
            executor.load(State(data[:cut]))
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptStateError):
        executor.load(path)
    with pytest.raises(CorruptStateError, match="cannot read"):
        executor.load(tmp_path / "missing.safetensors")

    n, header = _header(data)
    header["__metadata__"]["version"] = "9"
    raw = json.dumps(header).encode()
    newer = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    with pytest.raises(UnsupportedStateVersionError, match="version 9.*up to 2"):
        executor.load(State(newer))
    header["__metadata__"]["format"] = "something-else"
    raw = json.dumps(header).encode()
    with pytest.raises(CorruptStateError, match="not a saved choral conversation"):
        executor.load(State(struct.pack("<Q", len(raw)) + raw + data[8 + n :]))
    assert executor.engine.pool.num_used_blocks == used
    assert len(executor.conversations) == 1


def test_load_without_room_leaks_nothing(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make_executor(tiny_models["llama"][0], kv_cache_tokens=32, max_model_len=32) as executor:
        c = executor.create()
        c.prompt(list(range(3, 23)))  # 20 tokens = 5 of 8 blocks
        run(executor)
        state = c.save()
        with pytest.raises(KvCacheExhaustedError):
            executor.load(state)
        assert len(executor.conversations) == 1
        executor.check_invariants()


def test_save_while_pending_is_refused(executor: BatchedExecutor) -> None:
    from choral import RequiresInferenceError

    c = executor.create()
    c.prompt(PROMPT)
    with pytest.raises(RequiresInferenceError, match="save"):
        c.save()


def test_load_rejects_a_bad_source_type(executor: BatchedExecutor) -> None:
    from choral import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="path or a State"):
        executor.load(42)  # type: ignore[arg-type]
