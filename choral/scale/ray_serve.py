"""Replicas behind Ray Serve: the Python entry point (:func:`build_app`, for an existing Ray
cluster) and what ``choral serve --replicas N`` runs (:func:`run`).

On a Ray cluster::

    from ray import serve
    from choral.scale.ray_serve import build_app

    serve.run(build_app(model="smollm2-135m-instruct", replicas=4, kv_cache_tokens=65536),
              name="choral", route_prefix="/")

The application is two deployments: ``choral-replica`` (N engines, each the single server's app;
replica.py) behind ``choral-ingress`` (the HTTP entry point that hashes prompts and forwards;
ingress.py), whose handle routes with choral's prefix-aware router (router.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from choral.config import DEFAULT_MODEL, EngineConfig
from choral.errors import ConfigError
from choral.executor.config import ExecutorConfig
from choral.scale.config import ReplicaConfig, RoutingConfig, ServerOptions
from choral.scale.ingress import ChoralIngress
from choral.scale.replica import ChoralReplica
from choral.server.limits import ServerLimits

ROUTER_CLASS = "choral.scale.router:PrefixAwareRouter"
REPLICA_DEPLOYMENT = "choral-replica"
INGRESS_DEPLOYMENT = "choral-ingress"
APP_NAME = "choral"


def build_app(model: str = DEFAULT_MODEL, replicas: int = 2, *, served_model_name: str | None = None,
              api_key: str | None = None, routing: str | RoutingConfig = "prefix",
              cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
              executor: ExecutorConfig | None = None, limits: ServerLimits | None = None,
              **engine_options: Any) -> Application:
    """A Serve application of ``replicas`` choral engines serving ``model`` behind one
    OpenAI-compatible endpoint. ``engine_options`` are EngineConfig's (``kv_cache_tokens``,
    ``dtype``...; an unknown one is an error); ``routing`` is ``prefix``, ``pow2`` or a
    RoutingConfig. Pass it to ``serve.run``."""
    routing_config = routing if isinstance(routing, RoutingConfig) else RoutingConfig(policy=routing)
    config = ReplicaConfig(
        num_replicas=replicas, engine=EngineConfig.from_kwargs(model=model, **engine_options),
        executor=executor or ExecutorConfig(),
        server=ServerOptions(model_name=served_model_name or model, api_key=api_key,
                             limits=limits or ServerLimits()),
        routing=routing_config, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica)
    return application(config)


def application(config: ReplicaConfig) -> Application:
    """The Serve application of ``config`` (build_app's, from a ready config)."""
    routing = config.routing
    options: dict[str, Any] = {"request_routing_stats_period_s": routing.stats_period_s,
                               "request_routing_stats_timeout_s": max(5.0, 4 * routing.stats_period_s)}
    if routing.policy == "prefix":  # else Serve's default, power of two choices
        options.update(request_router_class=ROUTER_CLASS, request_router_kwargs=dataclasses.asdict(routing))
    router = RequestRouterConfig(**options)
    replica = cast(Deployment, serve.deployment(ChoralReplica)).options(
        name=REPLICA_DEPLOYMENT, num_replicas=config.num_replicas, max_ongoing_requests=config.max_ongoing_requests,
        health_check_period_s=config.health_check_period_s, health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_timeout_s=config.graceful_timeout_s,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        request_router_config=router)
    # The ingress only hashes and relays: it takes no CPU of the replicas' reservation.
    ingress_class: Any = serve.ingress()(ChoralIngress)
    ingress = cast(Deployment, serve.deployment(ingress_class)).options(
        name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1024, 4 * config.num_replicas * config.max_ongoing_requests))
    return ingress.bind(replica.bind(config), config)


def run(config: ReplicaConfig, host: str, port: int, address: str | None = None, num_cpus: int | None = None,
        log_level: str = "warning") -> int:
    """``choral serve --replicas N``: start Ray (a local cluster, or join ``address``), serve
    ``config`` on ``host:port`` until SIGINT/SIGTERM, then stop Serve and Ray (and with them every
    process Ray started here). ``log_level`` is Serve's (uvicorn's names). Returns the exit code."""
    import ray

    if address is None:
        cpus = num_cpus or os.cpu_count() or 1
        needed = config.num_replicas * config.cpus_per_replica
        if needed > cpus + 1e-9:
            raise ConfigError(f"{config.num_replicas} replicas x {config.cpus_per_replica:g} CPUs need {needed:g} "
                              f"CPUs; this machine has {cpus} (lower --replica-cpus or --replicas)")
    with _stop_on_signals():
        try:
            ray.init(address=address, num_cpus=None if address else cpus, include_dashboard=False,
                     configure_logging=False)
            # ray.init installs its own SIGTERM handler (which exits at once, leaving its
            # processes behind): ours again, so SIGTERM shuts everything down below.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            level = {"trace": "DEBUG"}.get(log_level.lower(), log_level.upper())
            serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": level})
            print(f"choral: starting {config.num_replicas} replicas of {config.engine.model!r} "
                  f"({config.routing.policy} routing) ...", flush=True)
            try:
                serve.run(application(config), name=APP_NAME, route_prefix="/")
            except RuntimeError as e:  # a replica that cannot start (its error is in the message and the logs)
                print(f"choral serve: the replicas did not start: {e}", file=sys.stderr, flush=True)
                return 1
            print(f"choral: serving {config.server.model_name!r} on http://{host}:{port}/v1 with "
                  f"{config.num_replicas} replicas; Ctrl-C stops", flush=True)
            threading.Event().wait()  # until a signal raises KeyboardInterrupt
        except KeyboardInterrupt:
            print("choral: stopping Serve and Ray ...", file=sys.stderr, flush=True)
        finally:
            with _ignoring_signals():
                if ray.is_initialized():
                    serve.shutdown()
                    ray.shutdown()
    return 0


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does (a KeyboardInterrupt on the main thread)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _ignoring_signals() -> Iterator[None]:
    """A second Ctrl-C must not cut the shutdown short (that would leave Ray's processes behind)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
