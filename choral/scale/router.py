"""The Serve request router that sends each request to the replica most likely to hold its prompt's
prefix (routing_policy.py decides; this file feeds it and applies the answer).

Serve runs one router per deployment handle, in the process that owns the handle (the ingress).
For each request it calls :meth:`choose_replicas`; the request carries a :class:`RouteHint` as
its ``hint`` keyword (its prompt's block hashes, from prompt_hashes.py). What the router knows:

- each replica's cached blocks, from the replica's routing stats (``record_routing_stats``,
  built from its KV events, refreshed every ``RoutingConfig.stats_period_s``);
- the prompts it routed since (``on_request_routed``), assumed cached there until the replica's
  report catches up or ``pending_ttl_s`` passes;
- its own requests in flight per replica (routed, not yet completed): the load.

A hint may instead name a replica by position (``target``: the i-th live replica by id), which is
how the ingress reaches every replica for ``/metrics``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from choral.scale.config import RoutingConfig
from choral.scale.prefix_index import PrefixIndex
from choral.scale.routing_policy import Choice, ReplicaView, choose


@dataclass(frozen=True)
class RouteHint:
    """What the router reads from a request: its prompt's block hashes, or a replica's position."""

    hashes: tuple[int, ...] = ()
    target: int | None = None


class PrefixAwareRouter(RequestRouter):
    """Prefix-cache affinity with a least-loaded fallback (see the module docstring)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.routing = RoutingConfig(**kwargs)
        self.index = PrefixIndex(self.routing.pending_ttl_s, time.monotonic)
        self.in_flight: dict[str, set[str]] = {}  # replica key -> internal request ids
        self.last_choice: Choice | None = None  # for logs and tests

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_key = {_key(r.replica_id): r for r in candidate_replicas}
        self._refresh()
        hint = _hint(pending_request)
        if hint.target is not None:
            keys = sorted(by_key)
            return [[by_key[keys[hint.target % len(keys)]]]]
        views = [ReplicaView(key, len(self.in_flight.get(key, ())), self.index.num_blocks(key),
                             self.index.matched_blocks(key, hint.hashes)) for key in sorted(by_key)]
        choice = choose(views, self.routing)
        self.last_choice = choice
        return [[by_key[key]] for key in choice.ranking]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = _key(replica_id)
        self.in_flight.setdefault(key, set()).add(pending_request.metadata.internal_request_id)
        hint = _hint(pending_request)
        if hint.hashes:
            self.index.routed(key, hint.hashes)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight.get(_key(replica_id), set()).discard(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(_key(replica_id), None)
        self.index.keep_only(_key(r) for r in self.curr_replicas if r != replica_id)

    def _refresh(self) -> None:
        """Take in each replica's latest routing stats; forget replicas that are gone (a
        replacement starts with an empty cache and a new id)."""
        live = {_key(rid): replica for rid, replica in self.curr_replicas.items()}
        self.index.keep_only(live)
        for key in [k for k in self.in_flight if k not in live]:
            del self.in_flight[key]
        for key, replica in live.items():
            stats = replica.routing_stats or {}
            if "kv_version" in stats:
                self.index.report(key, int(stats["kv_version"]), stats.get("kv_hashes", ()))


def _key(replica_id: ReplicaID) -> str:
    return str(replica_id.unique_id)


def _hint(pending_request: PendingRequest | None) -> RouteHint:
    hint = pending_request.kwargs.get("hint") if pending_request is not None else None
    if hint is None:
        return RouteHint()
    # Read by attribute, not isinstance: the ingress's code reaches its replica by value (Ray
    # pickles the deployment), so its RouteHint may be another copy of this class.
    target = getattr(hint, "target", None)
    return RouteHint(tuple(getattr(hint, "hashes", ())), int(target) if target is not None else None)
