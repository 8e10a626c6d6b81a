"""What a replicated deployment is made of: frozen, validated once, picklable (Ray ships it to
every replica).

``ReplicaConfig`` holds the engine's and the executor's own configs (validated by their own
classes, so an option a replica would refuse is refused before anything starts), the HTTP
server's options, and the routing's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from choral.config import EngineConfig
from choral.errors import ConfigError
from choral.executor.config import ExecutorConfig
from choral.server.limits import ServerLimits

ROUTINGS = ("prefix", "pow2")


@dataclass(frozen=True)
class RoutingConfig:
    """How requests are spread over the replicas (routing_policy.py has the rule).

    ``policy``: ``prefix`` (choral's prefix-aware router) or ``pow2`` (Serve's default
    power-of-two-choices router, which ignores prefixes: the baseline).
    ``imbalance_threshold``: in-flight requests the busiest replica may have above the idlest
    before prefixes are ignored and the least loaded replica is chosen.
    ``min_match_blocks``: cached leading blocks a replica must hold to win on its prefix.
    ``stats_period_s``: how often each replica reports its cached blocks (Serve's routing stats).
    ``pending_ttl_s``: how long the router assumes a replica holds a prompt it routed there
    before the replica's own report says so (the report lags by up to ``stats_period_s`` plus
    the prompt's prefill)."""

    policy: str = "prefix"
    imbalance_threshold: int = 8
    min_match_blocks: int = 1
    stats_period_s: float = 0.5
    pending_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.policy not in ROUTINGS:
            raise ConfigError(f"routing policy: {self.policy!r} is not one of {', '.join(ROUTINGS)}")
        if self.imbalance_threshold < 0:
            raise ConfigError(f"imbalance_threshold: must be >= 0, got {self.imbalance_threshold}")
        if self.min_match_blocks < 1:
            raise ConfigError(f"min_match_blocks: must be >= 1, got {self.min_match_blocks}")
        for name in ("stats_period_s", "pending_ttl_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class ServerOptions:
    """The single-process server's options, applied in every replica (create_app's arguments)."""

    model_name: str
    api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    strict: bool = False
    tool_call_parser: str | None = None
    pooling: str = "last"

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("model_name: must not be empty")
        if not isinstance(self.limits, ServerLimits):
            raise ConfigError(f"limits: must be a ServerLimits, got {type(self.limits).__name__}")


@dataclass(frozen=True)
class ReplicaConfig:
    """N replicas of one engine behind one endpoint.

    ``cpus_per_replica``: the CPUs Ray reserves for each replica; the engine's CPU threads default
    to it (``EngineConfig.num_threads`` None), so replicas on one host do not oversubscribe it.
    ``gpus_per_replica``: GPUs Ray reserves for each (0 on a CPU cluster).
    ``max_ongoing_requests``: requests Serve sends one replica at once (more wait in the router).
    ``health_check_period_s`` / ``health_check_timeout_s``: how often Serve asks each replica's engine
    whether its loop runs, and how long an answer may take before the replica is replaced.
    ``graceful_timeout_s``: how long a stopping replica lets its requests finish.
    """

    num_replicas: int
    engine: EngineConfig
    executor: ExecutorConfig
    server: ServerOptions
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int = 256
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    graceful_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_replicas, int) or isinstance(self.num_replicas, bool) or self.num_replicas < 1:
            raise ConfigError(f"num_replicas: must be a positive integer, got {self.num_replicas!r}")
        for name, cls in (("engine", EngineConfig), ("executor", ExecutorConfig), ("server", ServerOptions),
                          ("routing", RoutingConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.engine.enable_lora:
            # An adapter loaded at run time would reach one replica only, and routing cannot
            # tell replicas apart by adapter: refused rather than half working.
            raise ConfigError("enable_lora: LoRA adapters are not supported with replicas yet")
        if self.cpus_per_replica <= 0 or self.gpus_per_replica < 0:
            raise ConfigError("cpus_per_replica must be > 0 and gpus_per_replica >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")
        for name in ("health_check_period_s", "health_check_timeout_s", "graceful_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a positive number of seconds, got {value!r}")

    @property
    def max_threads(self) -> int:
        """The most CPU threads each replica's engine uses: ``EngineConfig.num_threads`` when set,
        else the CPUs reserved for it (the replica may use fewer on a loaded host, see replica.py)."""
        return self.engine.num_threads or max(1, math.floor(self.cpus_per_replica))
