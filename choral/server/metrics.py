"""Prometheus metrics for ``/metrics``: vLLM's names (``vllm:*``, so dashboards made for vLLM
work) and choral's own (``choral_*``), every one labelled ``model_name``.

Two sources. What the executor holds (queues, KV usage, prefix-cache and preemption totals) is
read at scrape time by a collector, as gauges and counters. What a request measured (latencies,
tokens, why it finished) is recorded once per finished sequence by :meth:`ServerMetrics.observe`,
which every request the server queues carries as its callback: it runs on the executor's thread
for every response, so a request cancelled because its client went away is counted too.
Counters are counters (``rate()`` them); nothing is a lifetime ratio.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from choral.executor import Executor, Response

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_RECENT_STEPS = 100  # steps the acceptance-rate gauge looks back over
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class _LiveCollector(Collector):
    """Gauges and counters read from the executor at scrape time, under the engine core's lock
    (prometheus calls ``collect`` from the scrape's thread: the server runs it in a worker)."""

    def __init__(self, executor: Executor, model_name: str):
        self.executor, self.model = executor, model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ex, m = self.executor, [self.model]
        core = ex.engine.core
        with core.lock:  # the loop thread changes these only while it holds the lock (a moment: between steps)
            running = len(ex.scheduler.running)
            waiting = len(ex.scheduler.waiting) + ex.num_queued_not_scheduled
            kv = core.kv.usage()
            drafted, accepted = ex.stepper.speculator.num_proposed, ex.stepper.speculator.num_accepted
        block_size = ex.engine.config.block_size
        usage = kv.num_used_blocks / kv.num_blocks
        # The pool counts whole blocks; vLLM counts tokens: a block is block_size tokens.
        queries = kv.prefix_queries * block_size
        hits = kv.prefix_hits * block_size
        preemptions = ex.aggregate.total_preemptions
        recent = ex.iteration_stats[-_RECENT_STEPS:]
        recent_drafted = sum(s.num_draft_tokens for s in recent)
        recent_rate = sum(s.num_accepted_tokens for s in recent) / recent_drafted if recent_drafted else 0.0

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(m, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(m, value)
            return family

        yield gauge("vllm:num_requests_running", "Sequences holding KV (running)", running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled", waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage, 1 = full", usage)
        yield gauge("vllm:gpu_cache_usage_perc", "KV cache usage, 1 = full (vLLM's older name)", usage)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", hits)
        yield counter("vllm:num_preemptions", "Sequences preempted", preemptions)
        yield gauge("choral_num_requests_running", "Sequences holding KV", running)
        yield gauge("choral_num_requests_waiting", "Sequences queued", waiting)
        yield gauge("choral_kv_cache_usage_perc", "Fraction of KV blocks in use", usage)
        yield gauge("choral_kv_cache_used_blocks", "KV blocks in use", kv.num_used_blocks)
        yield counter("choral_prefix_cache_queries", "Full prompt blocks looked up in the prefix cache",
                      kv.prefix_queries)
        yield counter("choral_prefix_cache_hits", "Full prompt blocks found in the prefix cache",
                      kv.prefix_hits)
        yield counter("choral_num_preemptions", "Sequences preempted", preemptions)
        yield counter("vllm:spec_decode_num_draft_tokens", "Speculative tokens proposed and verified", drafted)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Speculative tokens accepted", accepted)
        yield counter("choral_spec_decode_draft_tokens", "Speculative tokens proposed and verified", drafted)
        yield counter("choral_spec_decode_accepted_tokens", "Speculative tokens accepted", accepted)
        yield gauge("choral_spec_decode_acceptance_rate",
                    f"Accepted / proposed speculative tokens over the last {_RECENT_STEPS} steps (0: none proposed)",
                    recent_rate)


class ServerMetrics:
    """The server's registry: live values plus what finished requests measured."""

    def __init__(self, executor: Executor, model_name: str):
        self.model = model_name
        self.registry = r = CollectorRegistry()
        r.register(_LiveCollector(executor, model_name))
        labels = ["model_name"]
        self.counters: dict[str, Counter] = {}
        self.histograms: dict[str, Histogram] = {}
        for prefix in ("vllm:", "choral_"):
            self.counters[prefix + "prompt"] = Counter(f"{prefix}prompt_tokens", "Prompt tokens processed",
                                                       labels, registry=r)
            self.counters[prefix + "generation"] = Counter(f"{prefix}generation_tokens", "Tokens generated",
                                                           labels, registry=r)
            self.counters[prefix + "success"] = Counter(f"{prefix}request_success", "Finished sequences by reason",
                                                        [*labels, "finished_reason"], registry=r)
            self.histograms[prefix + "ttft"] = Histogram(f"{prefix}time_to_first_token_seconds",
                                                         "Time to first token", labels, buckets=_LATENCY_BUCKETS,
                                                         registry=r)
            self.histograms[prefix + "e2e"] = Histogram(f"{prefix}e2e_request_latency_seconds",
                                                        "End-to-end request latency", labels,
                                                        buckets=_LATENCY_BUCKETS, registry=r)
            self.histograms[prefix + "tpot"] = Histogram(f"{prefix}time_per_output_token_seconds",
                                                         "Time per output token after the first", labels,
                                                         buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.aborted = Counter("choral_request_aborted", "HTTP requests ended before their answer was complete, "
                               "by reason (client_disconnected, server_shutdown)", [*labels, "reason"], registry=r)
        self.histograms["vllm:queue"] = Histogram("vllm:request_queue_time_seconds", "Time waiting to be scheduled",
                                                  labels, buckets=_LATENCY_BUCKETS, registry=r)

    def observe(self, response: Response) -> None:
        """A request's callback: record each sequence as it finishes (any thread)."""
        result = response.result
        if result is None or not result.is_sequence_final:
            return
        m, timing = self.model, result.timing
        # vLLM's finished_reason values (stop, length, abort), and choral's own finer ones.
        reasons = {"vllm:": result.finish_reason.api_name or "abort", "choral_": result.finish_reason.value}
        gap = None
        if timing.latency is not None and timing.time_to_first_token is not None and result.num_output_tokens > 1:
            gap = (timing.latency - timing.time_to_first_token) / (result.num_output_tokens - 1)
        for prefix, reason in reasons.items():
            self.counters[prefix + "success"].labels(m, reason).inc()
            self.counters[prefix + "generation"].labels(m).inc(result.num_output_tokens)
            if result.sequence_index == 0:  # the prompt is shared by a request's n samples
                self.counters[prefix + "prompt"].labels(m).inc(result.num_prompt_tokens)
            if timing.time_to_first_token is not None:
                self.histograms[prefix + "ttft"].labels(m).observe(timing.time_to_first_token)
            if timing.latency is not None:
                self.histograms[prefix + "e2e"].labels(m).observe(timing.latency)
            if gap is not None:
                self.histograms[prefix + "tpot"].labels(m).observe(gap)
        if result.sequence_index == 0 and timing.queue_time is not None:
            self.histograms["vllm:queue"].labels(m).observe(timing.queue_time)

    def observe_abort(self, reason: str) -> None:
        """Count an HTTP request whose answer could not be completed (its executor requests were cancelled)."""
        self.aborted.labels(self.model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
