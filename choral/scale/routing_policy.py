"""Which replica a request goes to: the one most likely to hold its prompt's prefix, unless the
replicas' loads are too far apart.

Plain data in, one decision out, no Ray: the Serve router (router.py) gathers the inputs and
applies the answer. The rule, in order:

1. Loads unbalanced (the busiest replica has more than ``imbalance_threshold`` requests in flight
   above the idlest): the least loaded replica, whatever it caches. A hot prefix then spills onto
   other replicas instead of queueing on one.
2. Otherwise the replica whose cache holds the most leading blocks of the prompt (at least
   ``min_match_blocks``); ties go to the less loaded, then to the lower key.
3. No replica holds any of it: the least loaded; ties go to the replica caching the fewest blocks
   (new prefixes spread over the replicas), then to the lower key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from choral.scale.config import RoutingConfig


class Reason(Enum):
    """Why a replica was chosen (a router metric label)."""

    PREFIX = "prefix"  # it holds the longest cached prefix of the prompt
    IMBALANCE = "imbalance"  # loads were too far apart: the least loaded
    LEAST_LOADED = "least_loaded"  # nobody holds the prefix (or the request has no prompt)


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica when it decides."""

    key: str  # the replica's id
    load: int  # requests this router has in flight on it
    num_cached_blocks: int  # blocks the router believes it caches
    matched_blocks: int  # leading blocks of this prompt it believes it caches


@dataclass(frozen=True)
class Choice:
    """The ranking (best first) and why the first was chosen."""

    ranking: tuple[str, ...]
    reason: Reason
    matched_blocks: int  # of the first choice

    @property
    def key(self) -> str:
        return self.ranking[0]


def choose(views: Sequence[ReplicaView], config: RoutingConfig) -> Choice:
    """Rank ``views`` for one request (see the module's docstring). ``views`` must not be empty."""
    if not views:
        raise ValueError("no replica to choose from")
    by_load = sorted(views, key=lambda v: (v.load, v.num_cached_blocks, v.key))
    spread = by_load[-1].load - by_load[0].load
    if spread > config.imbalance_threshold:
        return _ranked(by_load, Reason.IMBALANCE)
    by_match = sorted(views, key=lambda v: (-v.matched_blocks, v.load, v.key))
    best = by_match[0]
    if best.matched_blocks >= config.min_match_blocks:
        return _ranked(by_match, Reason.PREFIX)
    return _ranked(by_load, Reason.LEAST_LOADED)


def _ranked(views: Sequence[ReplicaView], reason: Reason) -> Choice:
    return Choice(tuple(v.key for v in views), reason, views[0].matched_blocks)
