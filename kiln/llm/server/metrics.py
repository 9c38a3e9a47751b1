"""Prometheus metrics for the server, in a registry of its own (several apps can live in one process).

Counted by the server as requests come and go: requests by endpoint and HTTP status, finished requests by finish
reason, client aborts, prompt and generated tokens, TTFT / time-per-output-token / end-to-end histograms.
Read from the engine's latest stats snapshot at scrape time: running / waiting sequences, KV blocks in use and in
total, preemptions, plus the server's own requests in flight and event-loop tasks (for leak checks).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict], extra: Callable[[], dict]):
        self._stats, self._extra = stats, extra

    def collect(self):
        s, x = self._stats(), self._extra()
        gauges = [
            ("kiln_num_requests_running", "Sequences running in the engine (after the latest step)", s["num_running"]),
            ("kiln_num_requests_waiting", "Sequences waiting for the engine", s["num_waiting"]),
            ("kiln_kv_blocks_used", "KV cache blocks in use", s["kv_blocks_used"]),
            ("kiln_kv_blocks_total", "KV cache blocks in the pool", s["kv_blocks_total"]),
            ("kiln_kv_cache_usage_ratio", "Fraction of KV blocks in use",
             s["kv_blocks_used"] / max(1, s["kv_blocks_total"])),
            ("kiln_server_requests_in_flight", "Engine requests the server is waiting on", x["in_flight"]),
            ("kiln_server_event_loop_tasks", "asyncio tasks on the server's event loop (scrape excluded)",
             x["tasks"]),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("kiln_num_preemptions", "Sequences preempted for lack of KV blocks",
                                  value=s["num_preemptions"])
        yield CounterMetricFamily("kiln_engine_steps", "Model steps run by the engine", value=x["steps"])


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict], server_state: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("kiln_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("kiln_request_finished", "Engine requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.client_aborts = Counter("kiln_client_aborts", "Requests aborted because the client went away",
                                     registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of requests admitted to the engine",
                                     registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated (aborted requests included)",
                                         registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kiln_time_per_output_token_seconds",
                              "Mean time between output tokens of a finished completion",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Arrival to last token of a finished request",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats, server_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def count_loop_tasks() -> int:
    """Tasks on the running loop, not counting the caller's own."""
    return len(asyncio.all_tasks()) - 1
