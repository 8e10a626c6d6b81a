"""One replica: a choral engine and the single-process server's app (``create_app``), as a Ray
Serve deployment.

The ingress forwards each HTTP request here as an :class:`HttpCall` and relays the response
streamed back (asgi_call.py), so routes, streaming, errors and the API key are the single
server's own. Serve calls :meth:`check_health` (the engine's loop must be running) and
:meth:`record_routing_stats` (the blocks this replica caches, from its KV events) periodically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from choral.engine.llm_engine import LLMEngine
from choral.executor import Executor
from choral.scale.asgi_call import HttpCall, HttpStart, call_asgi
from choral.scale.config import ReplicaConfig
from choral.scale.kv_index import KvEventIndex
from choral.scale.metrics_merge import label_value
from choral.scale.router import RouteHint
from choral.server.app import create_app
from choral.threads import default_num_threads

REPLICA_HEADER = b"x-choral-replica"


class ChoralReplica:
    """A Serve replica serving one engine (see the module docstring)."""

    def __init__(self, config: ReplicaConfig):
        # Threads: the caller's, else the load-aware default (choral/threads.py) within the CPUs
        # Ray reserved for this replica (replicas on one host must not oversubscribe it).
        threads = config.engine.num_threads or min(config.max_threads, default_num_threads())
        engine = LLMEngine(dataclasses.replace(config.engine, num_threads=threads))
        if engine.tokenizer is not None:
            engine.tokenizer.warm_up()
        # KV events feed the routers (record_routing_stats); nothing else here reads them.
        self.executor = Executor(engine, dataclasses.replace(config.executor, record_kv_events=True))
        server = config.server
        self.app = create_app(self.executor, server.model_name, api_key=server.api_key, limits=server.limits,
                              strict=server.strict, tool_call_parser=server.tool_call_parser,
                              pooling=server.pooling)
        self.replica_id = str(serve.get_replica_context().replica_id.unique_id)
        self.num_threads = threads
        self.kv_index = KvEventIndex()
        self.kv_version = 0

    async def forward(self, call: HttpCall, hint: RouteHint | None = None) -> AsyncIterator[HttpStart | bytes]:
        """Run ``call`` through this replica's app; ``hint`` is the router's (unused here)."""
        async for item in call_asgi(self.app, call):
            if isinstance(item, HttpStart):  # which replica answered, for logs and clients
                item = HttpStart(item.status, (*item.headers, (REPLICA_HEADER, self.replica_id.encode())))
            yield item

    def check_health(self) -> None:
        """Serve's health check: raises (the replica is replaced) once the engine's loop has stopped."""
        if not self.executor.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the executor's loop is not running")

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing stats: the chained hashes of the blocks this replica caches now."""
        events = await asyncio.to_thread(self.executor.get_kv_cache_events)  # waits for the core's lock
        self.kv_index.apply(events)
        self.kv_version += 1
        return {"kv_version": self.kv_version, "kv_hashes": self.kv_index.hashes(), "replica": self.replica_id}

    async def metrics_text(self, hint: RouteHint | None = None) -> tuple[str, str]:
        """(replica id, this replica's /metrics text, with a ``choral_replica_info`` line first)."""
        text = (await asyncio.to_thread(self.app.state.metrics.render)).decode()
        info = (f"# HELP choral_replica_info This replica's process\n# TYPE choral_replica_info gauge\n"
                f'choral_replica_info{{pid="{os.getpid()}",host="{label_value(socket.gethostname())}",'
                f'threads="{self.num_threads}"}} 1\n')
        return self.replica_id, info + text

    def __del__(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown(wait=False)
