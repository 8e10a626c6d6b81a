"""Prometheus metrics for ``/metrics``: live gauges read at scrape time, histograms per request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from choral.executor import Executor, Result
from choral.executor.completion import Completion

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, executor: Executor, model_name: str):
        self.executor = executor
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model = model_name
        r = self.registry
        self.running = Gauge("choral_num_requests_running", "Sequences holding KV", labels, registry=r)
        self.waiting = Gauge("choral_num_requests_waiting", "Sequences queued", labels, registry=r)
        self.kv_usage = Gauge("choral_kv_cache_usage_perc", "Fraction of KV blocks in use", labels, registry=r)
        self.kv_used = Gauge("choral_kv_cache_used_blocks", "KV blocks in use", labels, registry=r)
        self.prefix_hit_rate = Gauge("choral_prefix_cache_hit_rate", "Prefix-cache block hits / queries",
                                     labels, registry=r)
        self.preemptions = Gauge("choral_num_preemptions_total", "Sequences preempted so far", labels, registry=r)
        self.prompt_tokens = Counter("choral_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("choral_generation_tokens", "Tokens generated", labels, registry=r)
        self.requests = Counter("choral_request_success", "Finished requests by finish reason",
                                [*labels, "finished_reason"], registry=r)
        self.aborted = Counter("choral_request_aborted", "HTTP requests ended before their answer was complete, "
                               "by reason (client_disconnected, server_shutdown)", [*labels, "reason"], registry=r)
        self.ttft = Histogram("choral_time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("choral_time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), registry=r)
        self.e2e = Histogram("choral_e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe_final(self, result: Result) -> None:
        """Record a finished sequence (call once per final result)."""
        m = self.model
        self.requests.labels(m, result.finish_reason.value).inc()
        self.generation_tokens.labels(m).inc(result.num_output_tokens)
        if result.sequence_index == 0:
            self.prompt_tokens.labels(m).inc(result.num_prompt_tokens)
        timing = result.timing
        if timing.time_to_first_token is not None:
            self.ttft.labels(m).observe(timing.time_to_first_token)
        if timing.latency is not None:
            self.e2e.labels(m).observe(timing.latency)
            if timing.time_to_first_token is not None and result.num_output_tokens > 1:
                self.tpot.labels(m).observe(
                    (timing.latency - timing.time_to_first_token) / (result.num_output_tokens - 1))

    def observe_abort(self, reason: str) -> None:
        """Count an HTTP request whose answer could not be completed (its executor requests were cancelled)."""
        self.aborted.labels(self.model, reason).inc()

    def observe_completion(self, completion: Completion) -> None:
        """Record every sequence of a finished non-streamed request."""
        for out in completion.outputs:
            self.observe_final(Result(
                is_final=True, is_sequence_final=True, sequence_index=out.index, output_token_ids=[], text="",
                finish_reason=out.finish_reason, logprobs=None, num_prompt_tokens=len(completion.prompt_token_ids),
                num_output_tokens=len(out.token_ids), num_cached_tokens=completion.num_cached_tokens,
                timing=completion.timing))

    def render(self) -> bytes:
        ex, m = self.executor, self.model
        pool = ex.kv.pool
        self.running.labels(m).set(len(ex.scheduler.running))
        self.waiting.labels(m).set(len(ex.scheduler.waiting) + ex.num_queued_not_scheduled)
        self.kv_used.labels(m).set(pool.num_used_blocks)
        self.kv_usage.labels(m).set(pool.num_used_blocks / pool.num_blocks)
        queries = pool.stats.prefix_queries
        self.prefix_hit_rate.labels(m).set(pool.stats.prefix_hits / queries if queries else 0.0)
        self.preemptions.labels(m).set(ex.aggregate.total_preemptions)
        return generate_latest(self.registry)
