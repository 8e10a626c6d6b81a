"""Property test: random sequences of create / prompt / infer / sample / fork / rewind / remove /
shift / save / load / close on a small pool. After every step the pool's books agree with the
open conversations' block tables (ref count == owners, no block both free and used) and every
conversation holds the tokens a plain-list model predicts; at the end every block is free."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from choral import (
    BatchedExecutor,
    ChoralError,
    ContextShift,
    Conversation,
    DecodeResult,
    KvCacheExhaustedError,
    PromptTooLongError,
    RequiresInferenceError,
    RequiresPromptError,
)
from tests.test_conversations import make_executor

OPS = ["create", "prompt", "grow", "grow", "grow", "infer", "infer", "sample", "fork", "rewind", "remove", "shift",
       "save_load", "close"]


@pytest.fixture(scope="module")
def small(tiny_models):  # type: ignore[no-untyped-def]
    # 12 blocks of 4 tokens, 16-token context, 8-token batches: NO_KV_SLOT and queueing happen often.
    ex = make_executor(tiny_models["llama"][0], kv_cache_tokens=48, max_model_len=16, max_num_batched_tokens=8)
    yield ex
    ex.close()


def _step(ex: BatchedExecutor, convs: list[Conversation], model: dict[int, list[int]], op: str,
          data: st.DataObject, exact: dict[int, bool]) -> None:
    if op == "create" or not convs:
        shift = ContextShift(keep=2) if data.draw(st.booleans()) else None
        c = ex.create(context_shift=shift)
        convs.append(c)
        model[c.id] = []
        exact[c.id] = True
        return
    c = convs[data.draw(st.integers(0, len(convs) - 1))]
    before = list(model[c.id])
    try:
        if op in ("prompt", "grow"):
            tokens = data.draw(st.lists(st.integers(0, 127), min_size=1, max_size=12))
            c.prompt(tokens, all_logits=data.draw(st.booleans()))
            expected = [*before, *tokens]
            if len(expected) > ex.max_context:  # the automatic shift made room
                assert c.context_shift is not None
                event("automatic context shift")
                assert c.tokens[:2] == before[:2] and c.tokens[-len(tokens):] == tokens
                expected = c.tokens
                exact[c.id] = False
            model[c.id] = expected
            if op == "grow":  # prompt and compute: conversations get long, the pool fills up
                event(f"grow: {ex.infer()}")
                event(f"grow: {ex.infer()}")
        elif op == "infer":
            result = ex.infer()
            event(str(result))
            assert result in (DecodeResult.OK, DecodeResult.NO_KV_SLOT)
        elif op == "sample":
            token = c.sample()
            assert 0 <= token < 128 and c.logits().shape == (128,)
        elif op == "fork":
            child = c.fork()
            convs.append(child)
            model[child.id] = list(before)
            exact[child.id] = exact[c.id]
        elif op == "rewind":
            n = data.draw(st.integers(0, len(before)))
            c.rewind(n)
            model[c.id] = before[: len(before) - n]
        elif op in ("remove", "shift"):
            if len(before) < 2:
                return
            start = data.draw(st.integers(0, len(before) - 1))
            end = data.draw(st.integers(start + 1, len(before)))
            recompute = op == "remove" and data.draw(st.booleans())
            if op == "remove":
                c.remove(start, end, recompute=recompute)
            else:
                c.shift_left(start, end - start)
            model[c.id] = before[:start] + before[end:]
            exact[c.id] = exact[c.id] and recompute
        elif op == "save_load":
            loaded = ex.load(c.save())
            convs.append(loaded)
            model[loaded.id] = list(before)
            exact[loaded.id] = exact[c.id]
        elif op == "close":
            c.close()
            convs.remove(c)
            del model[c.id]
    except (RequiresInferenceError, RequiresPromptError, PromptTooLongError, KvCacheExhaustedError) as e:
        event(f"{op}: {type(e).__name__}")
        assert c.is_closed or c.tokens == before  # a refused call changes nothing
    except ChoralError as e:  # anything else is a bug
        raise AssertionError(f"{op}: unexpected {e!r}") from e


def _finish(ex: BatchedExecutor) -> bool:
    while ex.batched_token_count:
        if ex.infer() is DecodeResult.NO_KV_SLOT:
            return False
    return True


def _check_logits_against_fresh(ex: BatchedExecutor, convs: list[Conversation]) -> None:
    """Whatever forks, copies-on-write, rewinds, exact removes and loads happened, re-computing a
    conversation's last token must give the logits of a fresh conversation with its tokens."""
    if not _finish(ex):
        return
    for c in convs:
        tokens = c.tokens
        if not tokens:
            continue
        c.rewind(1)
        c.prompt(tokens[-1])
        fresh = ex.create()
        try:
            fresh.prompt(tokens)
            if not _finish(ex):
                return
            assert (c.logits() - fresh.logits()).abs().max() <= 1e-4
            event("logits checked against a fresh conversation")
        finally:
            fresh.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_operations_keep_the_pool_consistent(small: BatchedExecutor, data: st.DataObject) -> None:
    convs: list[Conversation] = []
    model: dict[int, list[int]] = {}
    exact: dict[int, bool] = {}  # False once a shift kept K/V computed with dropped tokens in view
    pool = small.engine.pool
    try:
        for _ in range(data.draw(st.integers(1, 40))):
            op = data.draw(st.sampled_from(OPS))
            _step(small, convs, model, op, data, exact)
            small.check_invariants()
            for c in convs:
                assert c.tokens == model[c.id]
                assert c.token_count <= small.max_context
                assert len(c.block_table) <= -(-c.token_count // pool.block_size)
        _check_logits_against_fresh(small, [c for c in convs if exact[c.id]])
        small.check_invariants()
    finally:
        for c in convs:
            c.close()
    assert small.batched_token_count == 0
    assert pool.num_free_blocks == pool.num_blocks
    pool.check_invariants({})
