"""The replica router's plain-Python parts, without Ray: the routing rule with exact decisions,
what the router believes each replica caches, a replica's index of its KV events, prompt hashes
equal to the engine's own prefix-cache chain (in any process), the merged /metrics, one HTTP
request through an in-process app, and the deployment config's validation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from choral.config import EngineConfig
from choral.errors import ConfigError
from choral.executor.config import ExecutorConfig
from choral.kv.block_pool import BlockPool
from choral.kv.kv_cache import KvCache
from choral.kv.sequence_state import SequenceState
from choral.scale.asgi_call import HttpCall, HttpStart, call_asgi
from choral.scale.config import ReplicaConfig, RoutingConfig, ServerOptions
from choral.scale.kv_index import KvEventIndex
from choral.scale.metrics_merge import merge, with_label
from choral.scale.prefix_index import PrefixIndex
from choral.scale.prompt_hashes import PromptHasher, block_hashes
from choral.scale.routing_policy import Reason, ReplicaView, choose
from choral.server.limits import ServerLimits

CONFIG = RoutingConfig(imbalance_threshold=4)


def view(key: str, load: int = 0, cached: int = 0, matched: int = 0) -> ReplicaView:
    return ReplicaView(key, load, cached, matched)


# ---- the rule ----------------------------------------------------------------------------------
def test_longest_cached_prefix_wins() -> None:
    choice = choose([view("a", load=2, cached=10, matched=3), view("b", cached=50, matched=8),
                     view("c", load=1, matched=0)], CONFIG)
    assert choice.ranking == ("b", "a", "c") and choice.reason is Reason.PREFIX and choice.matched_blocks == 8


def test_equal_prefixes_go_to_the_less_loaded_then_the_lower_key() -> None:
    assert choose([view("a", load=3, matched=4), view("b", load=1, matched=4)], CONFIG).ranking == ("b", "a")
    assert choose([view("b", load=1, matched=4), view("a", load=1, matched=4)], CONFIG).ranking == ("a", "b")


def test_a_prefix_wins_while_loads_are_within_the_threshold() -> None:
    # spread 4 == threshold: still balanced enough for the prefix.
    choice = choose([view("a", load=4, matched=2), view("b", load=0)], CONFIG)
    assert choice.key == "a" and choice.reason is Reason.PREFIX


def test_unbalanced_loads_go_to_the_least_loaded_whatever_it_caches() -> None:
    choice = choose([view("a", load=5, matched=9), view("b", load=0), view("c", load=2, matched=3)], CONFIG)
    assert choice.ranking == ("b", "c", "a") and choice.reason is Reason.IMBALANCE and choice.matched_blocks == 0


def test_no_prefix_anywhere_goes_to_the_least_loaded_then_the_emptiest_cache() -> None:
    choice = choose([view("a", load=1), view("b", load=0, cached=30), view("c", load=0, cached=10)], CONFIG)
    assert choice.ranking == ("c", "b", "a") and choice.reason is Reason.LEAST_LOADED


def test_min_match_blocks_and_empty_views() -> None:
    config = RoutingConfig(min_match_blocks=3)
    assert choose([view("a", load=1, matched=2), view("b")], config).reason is Reason.LEAST_LOADED
    assert choose([view("a", load=1, matched=3), view("b")], config).key == "a"
    with pytest.raises(ValueError, match="no replica"):
        choose([], CONFIG)


# ---- what the router believes ------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_prefix_index_walks_the_chain_and_expires_pending() -> None:
    clock = Clock()
    index = PrefixIndex(pending_ttl_s=10.0, clock=clock)
    index.report("a", 1, [11, 12, 13, 99])
    assert index.matched_blocks("a", [11, 12, 13, 14]) == 3
    assert index.matched_blocks("a", [11, 50, 13]) == 1  # the walk stops at the first gap
    assert index.matched_blocks("b", [11]) == 0
    index.routed("b", [11, 12])  # routed there: assumed cached until the report catches up
    assert index.matched_blocks("b", [11, 12, 13]) == 2 and index.num_blocks("b") == 2
    clock.now += 10.5
    assert index.matched_blocks("b", [11]) == 0 and index.num_blocks("b") == 0


def test_prefix_index_reports_replace_older_ones_and_confirm_pending() -> None:
    clock = Clock()
    index = PrefixIndex(pending_ttl_s=10.0, clock=clock)
    index.routed("a", [1, 2])
    index.report("a", 5, [1, 7])
    assert index.num_blocks("a") == 3  # 1 and 7 reported, 2 still pending
    index.report("a", 4, [])  # an older report is ignored
    assert index.matched_blocks("a", [1, 2]) == 2
    index.report("a", 6, [7])  # block 1 evicted since
    assert index.matched_blocks("a", [1, 2]) == 0 and index.matched_blocks("a", [7]) == 1
    index.keep_only(["b"])
    assert index.num_blocks("a") == 0


def test_kv_event_index_follows_the_pool_events() -> None:
    pool = BlockPool(4, 2, record_events=True)
    a, b = pool.allocate(2)
    ha = BlockPool.chain_hash(None, [1, 2])
    hb = BlockPool.chain_hash(ha, [3, 4])
    pool.register(a, ha, [1, 2])
    pool.register(b, hb, [3, 4])
    index = KvEventIndex()
    index.apply(pool.stats.events)
    assert sorted(index.hashes()) == sorted([ha, hb])
    pool.free([a, b])
    pool.stats.events.clear()
    pool.allocate(3)  # two free blocks, then the LRU cached one (b, freed first) is evicted
    index.apply(pool.stats.events)
    assert index.hashes() == [ha] and index.num_events == 3
    with pytest.raises(ValueError, match="unknown KV event"):
        index.apply([("moved", 0, 1)])


# ---- prompt hashes -----------------------------------------------------------------------------
def test_block_hashes_equal_the_kv_cache_chain() -> None:
    pool = BlockPool(8, 4)
    kv = KvCache(pool)
    seq = SequenceState(token_ids=list(range(100, 114)))
    assert kv.admit(seq, [], 14)
    seq.num_computed_tokens = 14
    kv.register_full_blocks(seq)
    assert block_hashes(seq.token_ids, 4) == tuple(seq.block_hashes)  # 3 full blocks; the 2 last tokens not
    assert len(block_hashes(seq.token_ids, 4)) == 3


def test_chain_hash_is_the_same_in_another_process() -> None:
    code = ("from choral.kv.block_pool import BlockPool as B\n"
            "h = B.chain_hash(None, [1, 2, 3])\nprint(h, B.chain_hash(h, [4, 5, 6]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).parent.parent).stdout.split()
    h = BlockPool.chain_hash(None, [1, 2, 3])
    assert [int(x) for x in out] == [h, BlockPool.chain_hash(h, [4, 5, 6])]


class FakeTokenizer:
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        return [ord(c) for c in text]


def test_prompt_hasher_reads_completions_and_refuses_what_it_cannot_read() -> None:
    hasher = PromptHasher(FakeTokenizer(), 4, "m", ServerLimits(), 4096)  # type: ignore[arg-type]
    assert hasher.hashes("/v1/completions", b'{"prompt": "abcdefgh"}') == block_hashes([ord(c) for c in "abcdefgh"], 4)
    assert hasher.hashes("/v1/completions", b'{"prompt": [[1,2,3,4,5]], "model": "m"}') == block_hashes([1, 2, 3, 4], 4)
    assert hasher.hashes("/v1/completions", b'{"prompt": ["abcd", "zzzz"]}') == block_hashes([97, 98, 99, 100], 4)
    assert hasher.hashes("/v1/completions", b'{"prompt": "abcd", "model": "adapter"}') == ()  # salted chain
    assert hasher.hashes("/v1/completions", b"{not json") == ()
    assert hasher.hashes("/v1/completions", b'{"prompt": 5}') == ()
    assert hasher.hashes("/v1/models", b"") == ()
    assert hasher.hashes("/v1/chat/completions", b'{"messages": []}') == ()  # no template: the replica answers


def test_prompt_hasher_hashes_chats_as_the_server_renders_them(smollm_path: Path) -> None:
    from choral.loader.load import load_tokenizer
    from choral.server.chat_render import render_chat
    from choral.server.protocol import ChatCompletionRequest

    tokenizer = load_tokenizer(str(smollm_path))
    assert tokenizer is not None
    hasher = PromptHasher(tokenizer, 16, "m", ServerLimits(), 2048)
    body = {"messages": [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hi"}]}
    ids = render_chat(tokenizer, ChatCompletionRequest.model_validate(body), None).token_ids
    import json

    assert hasher.hashes("/v1/chat/completions", json.dumps(body).encode()) == block_hashes(ids, 16)
    assert len(block_hashes(ids, 16)) >= 5


# ---- /metrics ----------------------------------------------------------------------------------
def test_metrics_merge_groups_families_and_labels_replicas() -> None:
    a = '# HELP x_total X\n# TYPE x_total counter\nx_total{model_name="m"} 1.0\n# HELP y Y\n# TYPE y gauge\ny 2\n'
    b = '# HELP x_total X\n# TYPE x_total counter\nx_total{model_name="m"} 3.0\n'
    assert merge([("r1", a), ("r2", b)]) == (
        '# HELP x_total X\n# TYPE x_total counter\nx_total{replica="r1",model_name="m"} 1.0\n'
        'x_total{replica="r2",model_name="m"} 3.0\n# HELP y Y\n# TYPE y gauge\ny{replica="r1"} 2\n')
    assert with_label('h_bucket{le="+Inf"} 4', "replica", 'q"x') == 'h_bucket{replica="q\\"x",le="+Inf"} 4'
    with pytest.raises(ValueError, match="not a Prometheus sample"):
        with_label("", "replica", "r")


# ---- one HTTP request through an app -------------------------------------------------------------
def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, object]:
        return {"body": (await request.body()).decode(), "q": request.url.query,
                "auth": request.headers.get("authorization")}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts():  # type: ignore[no-untyped-def]
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(parts(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


async def _collect(call: HttpCall) -> list[HttpStart | bytes]:
    return [item async for item in call_asgi(_app(), call)]


def test_call_asgi_relays_status_headers_and_chunks() -> None:
    call = HttpCall("POST", "/echo", b"a=1", ((b"authorization", b"Bearer k"),), b"hello")
    start, *chunks = asyncio.run(_collect(call))
    assert isinstance(start, HttpStart) and start.status == 200
    assert b"".join(c for c in chunks if isinstance(c, bytes)) == b'{"body":"hello","q":"a=1","auth":"Bearer k"}'
    start, *chunks = asyncio.run(_collect(HttpCall("GET", "/stream")))
    assert isinstance(start, HttpStart) and start.header(b"content-type") == b"text/event-stream; charset=utf-8"
    assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    start, *chunks = asyncio.run(_collect(HttpCall("GET", "/boom")))  # Starlette's own 500, as behind uvicorn
    assert isinstance(start, HttpStart) and start.status == 500 and chunks == [b"Internal Server Error"]


def test_call_asgi_answers_an_app_that_fails_before_answering() -> None:
    async def broken(scope, receive, send):  # type: ignore[no-untyped-def]
        raise RuntimeError("no")

    async def run() -> list[HttpStart | bytes]:
        return [item async for item in call_asgi(broken, HttpCall("GET", "/"))]

    start, body = asyncio.run(run())
    assert isinstance(start, HttpStart) and start.status == 500
    assert body == b'{"error": {"message": "internal error: RuntimeError", "type": "InternalServerError", ' \
                   b'"param": null, "code": 500}}'


def test_call_asgi_closed_early_tells_the_app_the_client_left() -> None:
    seen: list[str] = []
    app = FastAPI()

    @app.get("/slow")
    async def slow(request: Request) -> StreamingResponse:
        async def parts():  # type: ignore[no-untyped-def]
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                seen.append("closed")
        return StreamingResponse(parts(), media_type="text/event-stream")

    async def first_two() -> list[HttpStart | bytes]:
        out: list[HttpStart | bytes] = []
        stream = call_asgi(app, HttpCall("GET", "/slow"))
        async for item in stream:
            out.append(item)
            if len(out) == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return out

    assert len(asyncio.run(first_two())) == 3
    assert seen == ["closed"]


# ---- config ------------------------------------------------------------------------------------
def test_configs_validate_every_field() -> None:
    with pytest.raises(ConfigError, match="routing policy"):
        RoutingConfig(policy="random")
    with pytest.raises(ConfigError, match="imbalance_threshold"):
        RoutingConfig(imbalance_threshold=-1)
    with pytest.raises(ConfigError, match="stats_period_s"):
        RoutingConfig(stats_period_s=0)
    server = ServerOptions(model_name="m")
    with pytest.raises(ConfigError, match="num_replicas"):
        ReplicaConfig(0, EngineConfig(), ExecutorConfig(), server)
    with pytest.raises(ConfigError, match="LoRA"):
        ReplicaConfig(2, EngineConfig(enable_lora=True), ExecutorConfig(), server)
    with pytest.raises(ConfigError, match="model_name"):
        ServerOptions(model_name="")
    config = ReplicaConfig(2, EngineConfig(), ExecutorConfig(), server, cpus_per_replica=3.0)
    assert config.max_threads == 3
    assert ReplicaConfig(2, EngineConfig(num_threads=1), ExecutorConfig(), server).max_threads == 1


# ---- the command line --------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "message"), [
    (["--routing", "pow2"], "--routing only apply with --replicas N > 1"),
    (["--replica-cpus", "1", "--ray-address", "auto"], "--replica-cpus, --ray-address only apply"),
    (["--replicas", "0"], "--replicas 0: must be at least 1"),
    (["--replicas", "2", "--lora", "a=/x"], "--lora / --enable-lora are not supported with --replicas"),
    (["--replicas", "2", "--enable-lora"], "--lora / --enable-lora are not supported with --replicas"),
])
def test_serve_refuses_what_replicas_do_not_support(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from choral.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


# ---- the Serve router's glue, with stand-in replicas (no cluster) -----------------------------------
@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass
class FakeReplica:
    replica_id: FakeId
    routing_stats: dict[str, object]


@dataclass
class FakeMeta:
    internal_request_id: str


@dataclass
class FakePending:
    kwargs: dict[str, object]
    metadata: FakeMeta


def _router(**routing: object) -> Any:
    router_module = pytest.importorskip("choral.scale.router")
    router = router_module.PrefixAwareRouter.__new__(router_module.PrefixAwareRouter)
    router.initialize_state(**routing)
    router._replicas = {}
    return router


def test_router_follows_reports_routed_prompts_loads_and_targets() -> None:
    from choral.scale.router import RouteHint

    router = _router(imbalance_threshold=1)
    a, b = FakeReplica(FakeId("a"), {}), FakeReplica(FakeId("b"), {"kv_version": 1, "kv_hashes": [7, 8]})
    router._replicas = {a.replica_id: a, b.replica_id: b}

    def pick(hint: RouteHint, request_id: str = "r") -> str:
        ranks = asyncio.run(router.choose_replicas([a, b], FakePending({"hint": hint}, FakeMeta(request_id))))
        return str(ranks[0][0].replica_id.unique_id)

    assert pick(RouteHint((7, 8, 9))) == "b"  # b reported 7 and 8
    assert pick(RouteHint((1, 2))) == "a"  # nobody has it: the emptier cache
    router.on_request_routed(FakePending({"hint": RouteHint((1, 2))}, FakeMeta("r1")), a.replica_id, None)
    assert pick(RouteHint((1, 2, 3))) == "a"  # routed there a moment ago: assumed cached
    router.on_request_routed(FakePending({"hint": RouteHint()}, FakeMeta("r2")), a.replica_id, None)
    assert pick(RouteHint((1, 2, 3))) == "b"  # a has 2 in flight, b none: above the threshold of 1
    router.on_request_completed(a.replica_id, "r2")
    assert pick(RouteHint((1, 2, 3))) == "a"
    assert [pick(RouteHint(target=i)) for i in range(3)] == ["a", "b", "a"]  # by position, ids sorted
    b.routing_stats = {"kv_version": 2, "kv_hashes": []}  # b evicted its blocks
    router._replicas = {a.replica_id: a, b.replica_id: b}
    assert pick(RouteHint((7, 8))) == "b"  # nobody holds 7, 8 now: the least loaded (a still has r1)


class FakeExecutor:
    def __init__(self, running: bool) -> None:
        self.is_running, self.shut_down = running, False

    def shutdown(self, wait: bool = True) -> None:
        self.shut_down = True


def test_replica_health_check_fails_once_the_engine_loop_stopped() -> None:
    replica_module = pytest.importorskip("choral.scale.replica")
    replica = replica_module.ChoralReplica.__new__(replica_module.ChoralReplica)
    replica.replica_id, replica.executor = "r1", FakeExecutor(True)
    replica.check_health()
    replica.executor = FakeExecutor(False)
    with pytest.raises(RuntimeError, match="r1: the executor's loop is not running"):
        replica.check_health()
    executor = replica.executor
    replica.__del__()  # Serve stopping the replica stops its engine
    assert executor.shut_down
