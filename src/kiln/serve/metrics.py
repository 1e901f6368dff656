"""Prometheus metrics of one server: the engine's gauges and counters, read when scraped, and
latency histograms observed as requests finish. Names follow vLLM's (`kiln:` for `vllm:`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The label values the counters below are known to take (exported at 0 from start-up).
FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "draining")  # kiln.serve.admission's codes
ERROR_STATUSES = ("400", "401", "404", "413", "415", "429", "499", "500", "503")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)  # fmt: skip


class EngineCollector(Collector):
    """Turns `engine.stats()` into gauges and counters at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        gauges = [
            ("num_requests_running", "Requests the engine is running.", s["num_running"]),
            ("num_requests_waiting", "Requests waiting to be scheduled.", s["num_waiting"]),
            ("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).", s["kv_cache_usage"]),
            ("kv_cache_free_blocks", "KV blocks free.", s["num_free_blocks"]),
            ("kv_cache_total_blocks", "KV blocks in the pool.", s["num_total_blocks"]),
            ("kv_cache_pool_tokens", "Token slots in the KV pool.", s["kv_pool_tokens"]),
            ("kv_blocks_per_seq_mean", "KV blocks a running sequence holds, mean.",
             s["kv_blocks_per_seq_mean"]),
            ("kv_blocks_per_seq_max", "KV blocks a running sequence holds, most.",
             s["kv_blocks_per_seq_max"]),
        ]  # fmt: skip
        queries, hits = s["prefix_cache_queries"], s["prefix_cache_hits"]
        gauges.append(
            (
                "prefix_cache_hit_rate",
                "Prefix-cache hits over queries since start (0 before any query).",
                hits / queries if queries else 0.0,
            )
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"kiln:{name}", doc, value=value)
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits),
            ("prompt_tokens", "Prompt tokens processed.", s["prompt_tokens_total"]),
            ("generation_tokens", "Tokens generated.", s["generation_tokens_total"]),
            ("kv_evicted_blocks", "KV blocks evicted under kv_budget.",
             s["kv_evicted_blocks_total"]),
        ]  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(f"kiln:{name}", doc, value=value)
        if "spec_decode_num_drafts" in s:
            yield from spec_decode_metrics(s)


def spec_decode_metrics(s: dict[str, Any]) -> Iterator[Metric]:
    """Speculative decoding's acceptance (vLLM's spec_decode_* names)."""
    counters = [
        ("num_drafts", "Verify steps of a sequence that carried proposed tokens."),
        ("num_draft_tokens", "Proposed tokens verified."),
        ("num_accepted_tokens", "Proposed tokens accepted."),
    ]
    for name, doc in counters:
        yield CounterMetricFamily(f"kiln:spec_decode_{name}", doc, value=s[f"spec_decode_{name}"])
    per_pos = CounterMetricFamily(
        "kiln:spec_decode_num_accepted_tokens_per_pos",
        "Proposed tokens accepted, by their position in the proposal.", labels=["position"],
    )  # fmt: skip
    for pos, value in enumerate(s["spec_decode_num_accepted_tokens_per_pos"]):
        per_pos.add_metric([str(pos)], value)
    yield per_pos
    gauges = [
        ("draft_acceptance_rate", "Accepted over proposed tokens since start.",
         s["spec_decode_acceptance_rate"]),
        ("mean_acceptance_length", "Tokens per verify step of a sequence (1 + accepted).",
         s["spec_decode_mean_acceptance_length"]),
    ]  # fmt: skip
    for name, doc, value in gauges:
        yield GaugeMetricFamily(f"kiln:spec_decode_{name}", doc, value=value)


class ServerMetrics:
    """One server's registry (never the global one, so several apps can live in a process)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        r = self.registry
        self.ttft = Histogram(
            "kiln:time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "kiln:time_per_output_token_seconds", "Time per output token after the first.",
            buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "kiln:e2e_request_latency_seconds", "Request latency, arrival to last token.",
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.finished = Counter(
            "kiln:request_success", "Finished requests by finish reason.", ["finished_reason"],
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "kiln:request_rejected", "Requests turned away by admission control.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "kiln:request_errors", "Requests answered with an error, by HTTP status.", ["status"],
            registry=r,
        )  # fmt: skip
        # Every label value known up front exported at 0 from the start (as vLLM does): a series
        # born at its first increment hides that increment from rate() and from alerts.
        for counter, values in ((self.finished, FINISH_REASONS), (self.rejected, REJECT_REASONS),
                                (self.errors, ERROR_STATUSES)):  # fmt: skip
            for value in values:
                counter.labels(value)

    def observe_request(
        self, arrival: float, first_token: float | None, finished: float, num_tokens: int
    ) -> None:
        """Record one finished request's latencies (time.monotonic() seconds)."""
        self.e2e.observe(finished - arrival)
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        if num_tokens > 1:
            self.tpot.observe((finished - first_token) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
