"""BatchedExecutor and Conversation on tiny fp32 models: fork, rewind, remove, shift, budgets,
NO_KV_SLOT recovery, state-machine errors, thread safety. Logits compared with max |diff| <= 1e-4
unless stated (different batch shapes change the float summation order, nothing else)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from choral import (
    LLM,
    BatchedExecutor,
    ConfigError,
    ContextShift,
    Conversation,
    ConversationClosedError,
    DecodeResult,
    ExecutorClosedError,
    InvalidRequestError,
    KvCacheExhaustedError,
    PromptTooLongError,
    RequiresInferenceError,
    RequiresPromptError,
    TokenIdOutOfRangeError,
)
from choral.conversation import CancelToken
from tests.conftest import hf_class, tiny_config

TOL = 1e-4
PROMPT = [5, 17, 33, 8, 91, 64, 12, 7, 100, 3]  # 10 tokens: with block_size 4, a partial last block


def make_executor(directory: Path, **options: object) -> BatchedExecutor:
    defaults: dict[str, object] = dict(dtype="float32", block_size=4, kv_cache_tokens=512, max_model_len=64)
    defaults.update(options)
    return BatchedExecutor(str(directory), **defaults)


def run(executor: BatchedExecutor) -> None:
    while executor.batched_token_count:
        assert executor.infer() is DecodeResult.OK


def greedy(executor: BatchedExecutor, conversation: Conversation, steps: int) -> list[int]:
    """Sample greedily and feed back ``steps`` times; returns the sampled tokens."""
    out = []
    for _ in range(steps):
        token = conversation.sample()
        out.append(token)
        conversation.prompt(token)
        run(executor)
    return out


def fresh_logits(executor: BatchedExecutor, tokens: list[int]) -> torch.Tensor:
    c = executor.create()
    c.prompt(tokens)
    run(executor)
    logits = c.logits().clone()
    c.close()
    return logits


@pytest.fixture()
def llama(tiny_models):  # type: ignore[no-untyped-def]
    executor = make_executor(tiny_models["llama"][0])
    yield executor
    executor.check_invariants()
    executor.close()
    assert executor.engine.pool.num_free_blocks == executor.engine.pool.num_blocks


def one_layer_model(arch: str, directory: Path) -> Path:
    """A 1-layer model: its cached K/V depend only on token and position, so a context shift is
    exact and logits can be compared with a fresh conversation."""
    torch.manual_seed(7)
    config = tiny_config(arch)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    config.num_hidden_layers = 1
    hf_class(arch)(config).eval().save_pretrained(str(directory), safe_serialization=True)
    return directory


# ---- fork -----------------------------------------------------------------------------------------
def test_fork_then_greedy_equals_independent_runs(llama: BatchedExecutor) -> None:
    parent = llama.create()
    parent.prompt(PROMPT)
    run(llama)
    child = parent.fork()
    assert child.block_table == parent.block_table and child.tokens == parent.tokens
    assert torch.equal(child.logits(), parent.logits())
    parent_out = greedy(llama, parent, 8)
    child.prompt(42)  # the child goes another way
    run(llama)
    child_out = greedy(llama, child, 8)
    # The full blocks stay shared, the partial last block was copied on write.
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]

    ref_parent = llama.create()
    ref_parent.prompt(PROMPT)
    run(llama)
    assert greedy(llama, ref_parent, 8) == parent_out
    ref_child = llama.create()
    ref_child.prompt([*PROMPT, 42])
    run(llama)
    assert greedy(llama, ref_child, 8) == child_out
    assert (ref_parent.logits() - parent.logits()).abs().max() <= TOL
    assert (ref_child.logits() - child.logits()).abs().max() <= TOL
    llama.check_invariants()


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    config = tiny_config("llama")
    config.max_position_embeddings = 2048
    d = tmp_path_factory.mktemp("tiny-llama-2k")
    hf_class("llama")(config).eval().save_pretrained(str(d), safe_serialization=True)
    return d


def test_fork_1000_tokens_32_times_costs_one_block_per_fork(long_context_dir: Path) -> None:
    with make_executor(long_context_dir, block_size=16, kv_cache_tokens=4096, max_model_len=2048,
                       max_num_batched_tokens=1024) as executor:
        pool = executor.engine.pool
        root = executor.create()
        root.prompt([(i * 7) % 120 + 3 for i in range(1000)])
        run(executor)
        used = pool.num_used_blocks
        assert used == 63  # ceil(1000 / 16)
        forks = [root.fork() for _ in range(32)]
        assert pool.num_used_blocks == used  # forking shares every block
        for i, f in enumerate(forks):
            f.prompt(i + 3)
        run(executor)
        assert pool.num_used_blocks - used <= 32  # the partial last block, copied once per fork
        executor.check_invariants()
        for f in forks:
            f.close()
        assert pool.num_used_blocks == used
        executor.check_invariants()


def test_fork_while_pending_is_refused(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    with pytest.raises(RequiresInferenceError, match="fork"):
        c.fork()
    assert len(llama.conversations) == 1


# ---- rewind / remove ------------------------------------------------------------------------------
def test_rewind_then_prompt_equals_fresh(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    run(llama)
    out = greedy(llama, c, 6)
    child = c.fork()
    c.rewind(9)  # back into the shared blocks
    assert c.tokens == PROMPT[:7] and not c.requires_sampling
    with pytest.raises(RequiresPromptError):
        c.sample()
    c.prompt([77, 78])
    run(llama)
    expected = fresh_logits(llama, [*PROMPT[:7], 77, 78])
    assert (c.logits() - expected).abs().max() <= TOL
    # The fork kept its own view of the shared blocks.
    assert child.tokens == [*PROMPT, *out]
    assert (child.logits() - fresh_logits(llama, [*PROMPT, *out])).abs().max() <= TOL
    llama.check_invariants()


def test_remove_recompute_equals_fresh(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    run(llama)
    c.remove(2, 6)
    assert c.tokens == PROMPT[:2] + PROMPT[6:]
    assert c.requires_inference and llama.batched_token_count == 4
    run(llama)
    assert (c.logits() - fresh_logits(llama, PROMPT[:2] + PROMPT[6:])).abs().max() <= TOL
    c.remove(4, 6)  # the end: same as rewind(2), nothing left to compute
    assert c.tokens == PROMPT[:2] + PROMPT[6:8] and not c.requires_inference and not c.requires_sampling


# ---- shift_left -----------------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen3", "mistral"])
def test_shift_left_matches_fresh_at_new_positions(arch: str, tmp_path: Path) -> None:
    with make_executor(one_layer_model(arch, tmp_path)) as executor:
        tokens = [(i * 13) % 120 + 3 for i in range(30)]
        c = executor.create()
        c.prompt(tokens)
        run(executor)
        c.shift_left(keep=3, discard=11)
        kept = tokens[:3] + tokens[14:]
        assert c.tokens == kept and c.token_count == 19
        executor.check_invariants()
        c.prompt(50)
        run(executor)
        diff = (c.logits() - fresh_logits(executor, [*kept, 50])).abs().max()
        assert diff <= 1e-3
        # remove(recompute=False) is the same operation anywhere in the sequence.
        c.remove(5, 9, recompute=False)
        c.prompt(51)
        run(executor)
        expected = fresh_logits(executor, [*kept[:5], *kept[9:], 50, 51])
        assert (c.logits() - expected).abs().max() <= 1e-3


def test_shift_left_layer0_kv_equals_fresh_on_deep_model(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """In a multi-layer model only layer 0's K/V depend on token and position alone: those must
    match a fresh computation after the shift (later layers keep what the dropped tokens added)."""
    with make_executor(tiny_models["llama3"][0]) as executor:
        tokens = [(i * 11) % 120 + 3 for i in range(21)]
        c = executor.create()
        c.prompt(tokens)
        run(executor)
        fork = c.fork()  # the shift must copy the shared blocks it writes into
        c.shift_left(keep=2, discard=5)
        kept = tokens[:2] + tokens[7:]
        ref = executor.create()
        ref.prompt(kept)
        run(executor)
        k, v = executor.engine.runner.read_tokens(c.block_table, len(kept))
        rk, rv = executor.engine.runner.read_tokens(ref.block_table, len(kept))
        assert (k[0] - rk[0]).abs().max() <= 1e-4 and (v[0] - rv[0]).abs().max() <= 1e-6
        fk, _ = executor.engine.runner.read_tokens(fork.block_table, len(tokens))
        full = executor.create()
        full.prompt(tokens)
        run(executor)
        ok, _ = executor.engine.runner.read_tokens(full.block_table, len(tokens))
        assert (fk[1] - ok[1]).abs().max() <= 1e-5  # the fork is untouched
        executor.check_invariants()


def test_automatic_context_shift_keeps_generating(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make_executor(tiny_models["llama"][0], max_model_len=24) as executor:
        c = executor.create(context_shift=ContextShift(keep=4))
        c.prompt(PROMPT)
        run(executor)
        out = greedy(executor, c, 40)
        assert len(out) == 40 and c.token_count <= 24
        assert c.tokens[:4] == PROMPT[:4]
        executor.check_invariants()
        plain = executor.create()
        plain.prompt(PROMPT)
        run(executor)
        with pytest.raises(PromptTooLongError, match="context_shift"):
            plain.prompt(list(range(3, 20)))
        assert plain.tokens == PROMPT
    with pytest.raises(InvalidRequestError, match="keep"):
        ContextShift(keep=-1)


def test_prompt_past_the_context_without_shift(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    run(llama)
    with pytest.raises(PromptTooLongError, match="context limit 64"):
        c.prompt([4] * 60)
    assert c.tokens == PROMPT and c.requires_sampling


# ---- batching budget, NO_KV_SLOT, cancel ----------------------------------------------------------
def test_budget_splits_batches_and_queues_the_rest(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make_executor(tiny_models["llama"][0], max_num_batched_tokens=4) as executor:
        a, b = executor.create(), executor.create()
        a.prompt(PROMPT)
        b.prompt(PROMPT[:3])
        assert executor.batched_token_count == 13 and executor.batch_queue_count == 4
        counts = []
        while executor.batched_token_count:
            assert executor.infer() is DecodeResult.OK
            counts.append(executor.batched_token_count)
        assert counts == [9, 5, 1, 0]
        assert executor.infer() is DecodeResult.OK  # nothing queued
        with make_executor(tiny_models["llama"][0]) as whole:
            assert (a.logits() - fresh_logits(whole, PROMPT)).abs().max() <= TOL
            assert (b.logits() - fresh_logits(whole, PROMPT[:3])).abs().max() <= TOL


def test_no_kv_slot_then_recovery_equals_uninterrupted(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make_executor(tiny_models["llama"][0], kv_cache_tokens=32, max_model_len=32) as executor:
        pool = executor.engine.pool
        hog = executor.create()
        hog.prompt(list(range(3, 15)))  # 12 tokens = 3 of the 8 blocks
        run(executor)
        b, c = executor.create(), executor.create()
        b.prompt(PROMPT)  # 3 blocks
        c.prompt(PROMPT[::-1])  # 3 blocks: 6 > 5 free
        assert executor.infer() is DecodeResult.NO_KV_SLOT
        assert executor.batched_token_count == 20 and pool.num_free_blocks == 5
        assert b.requires_inference and c.requires_inference
        executor.check_invariants()
        hog.close()
        assert executor.infer() is DecodeResult.OK
        out_b, out_c = greedy(executor, b, 5), greedy(executor, c, 5)
    with make_executor(tiny_models["llama"][0]) as ref:
        for conv_tokens, out in ((PROMPT, out_b), (PROMPT[::-1], out_c)):
            r = ref.create()
            r.prompt(conv_tokens)
            run(ref)
            assert greedy(ref, r, 5) == out


def test_cancelled_infer_changes_nothing(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    token = CancelToken()
    token.cancel()
    assert llama.infer(cancel=token) is DecodeResult.CANCELLED
    assert c.requires_inference and llama.batched_token_count == len(PROMPT)
    assert llama.infer(cancel=CancelToken()) is DecodeResult.OK


def test_all_logits_offsets(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT, all_logits=True)
    run(llama)
    for offset in (0, 3, 9):
        expected = fresh_logits(llama, PROMPT[: len(PROMPT) - offset])
        assert (c.logits(offset) - expected).abs().max() <= TOL
    with pytest.raises(InvalidRequestError, match="outside"):
        c.logits(10)
    d = llama.create()
    d.prompt(PROMPT)
    run(llama)
    with pytest.raises(InvalidRequestError, match="all_logits"):
        d.logits(1)


# ---- state machine and bad input -------------------------------------------------------------------
def test_state_machine_errors(llama: BatchedExecutor) -> None:
    c = llama.create()
    with pytest.raises(RequiresPromptError, match="prompt it"):
        c.sample()
    c.prompt(PROMPT)
    for call in (c.sample, lambda: c.prompt(3), c.fork, lambda: c.rewind(1), lambda: c.shift_left(1, 1),
                 lambda: c.remove(0, 1), c.save):
        with pytest.raises(RequiresInferenceError):
            call()
    assert c.tokens == PROMPT and llama.batched_token_count == len(PROMPT)
    run(llama)
    assert c.requires_sampling and isinstance(c.sample(), int)
    c.close()
    c.close()  # idempotent
    for call in (c.sample, lambda: c.prompt(3), c.fork, c.save):
        with pytest.raises(ConversationClosedError):
            call()


@pytest.mark.parametrize("bad, error", [
    ([], InvalidRequestError), ([3, 128], TokenIdOutOfRangeError), (-1, TokenIdOutOfRangeError),
    ([1.5], InvalidRequestError), (True, InvalidRequestError), ("text", InvalidRequestError),
])
def test_bad_prompts_leave_state_unchanged(llama: BatchedExecutor, bad: object, error: type) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    run(llama)
    with pytest.raises(error):
        c.prompt(bad)  # type: ignore[arg-type]
    assert c.tokens == PROMPT and c.requires_sampling and llama.batched_token_count == 0


def test_bad_edits_leave_state_unchanged(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    run(llama)
    table = c.block_table
    for call in (lambda: c.rewind(11), lambda: c.rewind(-1), lambda: c.remove(3, 3), lambda: c.remove(0, 11),
                 lambda: c.shift_left(5, 6), lambda: c.shift_left(0, 0), lambda: c.sample(offset=1)):
        with pytest.raises(InvalidRequestError):
            call()
    assert c.tokens == PROMPT and c.block_table == table and c.requires_sampling


def test_executor_close_and_context_manager(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make_executor(tiny_models["llama"][0]) as executor:
        c = executor.create()
        c.prompt(PROMPT)
        run(executor)
    assert executor.is_closed and c.is_closed
    assert executor.engine.pool.num_free_blocks == executor.engine.pool.num_blocks
    for call in (executor.create, executor.infer, lambda: executor.load(Path("x"))):
        with pytest.raises(ExecutorClosedError, match="closed"):
            call()
    with pytest.raises(ConversationClosedError):
        c.prompt(3)


def test_executor_construction(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory = tiny_models["llama"][0]
    llm = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=256, max_model_len=64)
    shared = BatchedExecutor(llm)
    assert shared.engine is llm.engine  # no options: the LLM's cache is shared
    own = BatchedExecutor(llm, kv_cache_tokens=64)
    assert own.engine.loaded is llm.engine.loaded and own.engine.pool is not llm.engine.pool
    with pytest.raises(ConfigError, match="dtype: fixed by the loaded model"):
        BatchedExecutor(llm, dtype="bfloat16")
    with pytest.raises(ConfigError, match="unknown engine option"):
        BatchedExecutor(llm, max_batch=3)
    with pytest.raises(ConfigError, match="model: expected"):
        BatchedExecutor(3.5)


def test_threads_prompting_and_inferring_concurrently(llama: BatchedExecutor) -> None:
    prompts = [[(i * 5 + j * 3) % 120 + 3 for j in range(6 + i)] for i in range(4)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = llama.create()
            c.prompt(prompts[i])
            out = []
            for _ in range(6):
                while c.requires_inference:
                    assert llama.infer() is DecodeResult.OK
                token = c.sample()
                out.append(token)
                c.prompt(token)
            results[i] = out
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    llama.check_invariants()
    for i, p in enumerate(prompts):
        ref = llama.create()
        ref.prompt(p)
        run(llama)
        assert greedy(llama, ref, 6) == results[i]


def test_torch_backend_gives_the_same_conversation(tiny_models) -> None:  # type: ignore[no-untyped-def]
    outs = []
    for backend in ("auto", "torch"):
        with make_executor(tiny_models["mistral"][0], attention_backend=backend) as executor:
            c = executor.create()
            c.prompt(PROMPT)
            run(executor)
            f = c.fork()
            out = greedy(executor, c, 6) + greedy(executor, f, 6)
            c.shift_left(2, 5)
            c.prompt(9)
            run(executor)
            outs.append((out, c.logits().clone()))
    assert outs[0][0] == outs[1][0]
    assert (outs[0][1] - outs[1][1]).abs().max() <= TOL


def test_wait_for_logits_shares_batches_and_reports_no_kv_slot(tiny_models) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    with make_executor(tiny_models["llama"][0], kv_cache_tokens=32, max_model_len=32) as executor:
        runner = executor.engine.runner
        sizes: list[int] = []
        real_execute = runner.execute
        runner.execute = lambda chunks: sizes.append(len(chunks)) or real_execute(chunks)  # type: ignore[method-assign]

        async def decode(c: Conversation, tokens: list[int]) -> list[int]:
            c.prompt(tokens)
            out = []
            for _ in range(4):
                await executor.wait_for_logits(c)
                out.append(c.sample())
                c.prompt(out[-1])
            await executor.wait_for_logits(c)
            return out

        async def main() -> list[list[int]]:
            return list(await asyncio.gather(decode(executor.create(), PROMPT[:5]),
                                             decode(executor.create(), PROMPT[5:])))

        outs = asyncio.run(main())
        assert sizes == [2] * 5
        for c in executor.conversations:
            c.close()
        hog = executor.create()
        hog.prompt(list(range(3, 31)))  # 7 of the 8 blocks
        run(executor)
        with pytest.raises(KvCacheExhaustedError, match="close a conversation"):
            asyncio.run(decode(executor.create(), PROMPT))
        runner.execute = real_execute  # type: ignore[method-assign]
    with make_executor(tiny_models["llama"][0]) as ref:
        for tokens, out in zip((PROMPT[:5], PROMPT[5:]), outs, strict=True):
            r = ref.create()
            r.prompt(tokens)
            run(ref)
            assert greedy(ref, r, 4) == out


def test_bad_executor_arguments(llama: BatchedExecutor) -> None:
    with pytest.raises(InvalidRequestError, match="context_shift"):
        llama.create(context_shift=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="cancel"):
        llama.infer(cancel=True)  # type: ignore[arg-type]
    c = llama.create()
    c.prompt(PROMPT)
    run(llama)
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        c.sample({"temperature": 0})  # type: ignore[arg-type]
    assert len(llama.conversations) == 1


def test_logits_are_live_and_editable(llama: BatchedExecutor) -> None:
    c = llama.create()
    c.prompt(PROMPT)
    run(llama)
    first = c.sample()
    c.logits()[first] = float("-inf")  # steer the sampler (e.g. a ban, guidance)
    assert c.sample() != first
    fork = c.fork()  # the fork got its own copy
    fork.logits()[:] = 0.0
    assert c.sample() != first and fork.logits().abs().max() == 0
