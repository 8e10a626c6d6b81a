"""ExecutorConfig: batching strategy, KV policy, queue and cache options (frozen, validated)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from choral.errors import ConfigError, InvalidRequestError
from choral.speculative.config import SpeculativeConfig


class BatchingStrategy(enum.Enum):
    """When requests join a batch (zigllama's four plus TRT-LLM's static batching).

    - CONTINUOUS: every step admits waiting requests while budgets allow (in-flight batching).
    - STATIC: when nothing runs, the waiting requests (up to ``max_num_seqs`` sequences) form a
      batch, which runs to completion before the next forms.
    - FIXED_SIZE: like STATIC, but a batch forms only once ``batch_size`` requests wait, and
      takes the first ``batch_size``.
    - DYNAMIC_TIMEOUT: like FIXED_SIZE, but a batch also forms when the oldest waiting request
      has waited ``timeout_ms``.
      (A batch keeps its members: one that does not fit yet, or is preempted, is admitted again
      as room frees up; no other request joins until every member has ended.)
    - ADAPTIVE: CONTINUOUS with a sequence cap that follows load: after each step, if the step
      took longer than ``latency_target_ms`` the cap shrinks to 3/4 (not below
      ``adaptive_min_batch`` or above ``max_num_seqs``); else, if requests are waiting, it grows
      by 1 (up to ``max_num_seqs``). The cap is reported in the iteration stats; a request wider
      than the cap is admitted when nothing else runs.
    """

    CONTINUOUS = "continuous"
    STATIC = "static"
    FIXED_SIZE = "fixed_size"
    DYNAMIC_TIMEOUT = "dynamic_timeout"
    ADAPTIVE = "adaptive"


class KvPolicy(enum.Enum):
    """How admission treats the KV cache (TRT-LLM's capacity scheduler policies).

    - MAX_UTILIZATION: admit while the prompt's blocks fit; when a running sequence needs a
      block and none is free, preempt the lowest-priority (then newest) sequence: its blocks are
      freed and it is recomputed later (its full blocks usually come back from the prefix cache).
    - GUARANTEED_NO_EVICT: admit only when prompt + max_tokens fit next to what every running
      request may still need; nothing is ever preempted.
    """

    MAX_UTILIZATION = "max_utilization"
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"


@dataclass(frozen=True)
class ExecutorConfig:
    strategy: BatchingStrategy = BatchingStrategy.CONTINUOUS
    kv_policy: KvPolicy = KvPolicy.MAX_UTILIZATION
    max_queue_size: int = 1024
    batch_size: int = 8  # FIXED_SIZE / DYNAMIC_TIMEOUT batch size
    timeout_ms: float = 100.0  # DYNAMIC_TIMEOUT
    latency_target_ms: float = 250.0  # ADAPTIVE
    adaptive_min_batch: int = 1
    priority_aging_per_s: float = 0.1  # priority a waiting request gains per second waited
    enable_prefix_cache: bool = True
    iteration_stats_max: int = 1000
    record_kv_events: bool = False
    # Speculative decoding for requests that do not set SamplingParams.speculative (None: off).
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, BatchingStrategy):
            raise ConfigError(f"strategy: must be a BatchingStrategy, got {self.strategy!r}")
        if not isinstance(self.kv_policy, KvPolicy):
            raise ConfigError(f"kv_policy: must be a KvPolicy, got {self.kv_policy!r}")
        for name in ("max_queue_size", "batch_size", "adaptive_min_batch", "iteration_stats_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive int, got {value!r}")
        for name in ("timeout_ms", "latency_target_ms"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{name}: must be a positive number, got {value!r}")
        if self.speculative is not None:
            try:
                object.__setattr__(self, "speculative", SpeculativeConfig.coerce(self.speculative))
            except InvalidRequestError as e:
                raise ConfigError(str(e)) from None
        if not isinstance(self.priority_aging_per_s, int | float) or self.priority_aging_per_s < 0:
            raise ConfigError(f"priority_aging_per_s: must be >= 0, got {self.priority_aging_per_s!r}")
