"""Executor statistics: per-iteration records (ring buffer) and running aggregates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IterationStats:
    """One scheduler step."""

    iteration: int
    timestamp: float  # time.time() at the end of the step
    step_latency_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_scheduled_sequences: int
    num_running: int  # sequences holding KV after the step
    num_waiting: int  # sequences queued after the step
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    prefix_hit_blocks: int  # blocks admitted from the prefix cache this step
    num_preemptions: int  # sequences preempted this step
    num_admitted: int
    seq_cap: int  # the scheduler's sequence cap (moves under ADAPTIVE)
    num_draft_tokens: int = 0  # speculative decoding: proposed tokens verified this step
    num_accepted_tokens: int = 0  # of which the target accepted

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed tokens this step (None when nothing was proposed)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None


@dataclass
class AggregateStats:
    """Totals since start (zigllama's BatchStats and more)."""

    total_requests: int = 0  # finished requests, whatever the reason
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0  # ended with an error response (e.g. its logits processor raised)
    total_prompt_tokens: int = 0
    total_cached_prompt_tokens: int = 0
    total_output_tokens: int = 0
    total_preemptions: int = 0
    sum_latency_s: float = 0.0
    sum_queue_time_s: float = 0.0
    sum_ttft_s: float = 0.0
    num_with_first_token: int = 0
    busy_time_s: float = 0.0  # time spent in steps
    total_draft_tokens: int = 0  # speculative decoding: proposed tokens verified (finished requests)
    total_accepted_tokens: int = 0  # of which accepted

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed tokens over finished requests (None when nothing was proposed)."""
        return self.total_accepted_tokens / self.total_draft_tokens if self.total_draft_tokens else None

    @property
    def mean_latency_s(self) -> float:
        return self.sum_latency_s / self.total_requests if self.total_requests else 0.0

    @property
    def mean_queue_time_s(self) -> float:
        return self.sum_queue_time_s / self.total_requests if self.total_requests else 0.0

    @property
    def mean_time_to_first_token_s(self) -> float:
        return self.sum_ttft_s / self.num_with_first_token if self.num_with_first_token else 0.0

    @property
    def mean_throughput_tps(self) -> float:
        """Output tokens per second of busy time."""
        return self.total_output_tokens / self.busy_time_s if self.busy_time_s else 0.0

    @property
    def total_tokens(self) -> int:
        return self.total_prompt_tokens + self.total_output_tokens
