"""Prometheus metrics of one server (its own registry, so two apps in one process do not collide).

Gauges are read at scrape time from the engine process's last report (sent with every step and whenever
it goes idle): running / waiting requests, KV blocks used and free, block-manager checks. Counters and
histograms are fed as outputs arrive.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets (seconds): a CPU step of a small model is ~10-100 ms, a GPU decode step ~1-20 ms.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                1.0, 2.5)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, aengine, model_name: str):
        r = self.registry = CollectorRegistry()
        label = {"model_name": model_name}

        def gauge(name, doc, fn):
            g = Gauge(name, doc, list(label), registry=r)
            g.labels(**label).set_function(fn)

        gauge("lowbit_num_requests_running", "Requests holding KV blocks (prefilling or decoding).",
              lambda: aengine.num_running)
        gauge("lowbit_num_requests_waiting", "Requests queued for admission.", lambda: aengine.num_waiting)
        gauge("lowbit_kv_blocks_total", "KV-cache blocks in the pool.", lambda: aengine.stats[3])
        gauge("lowbit_kv_blocks_free", "KV-cache blocks free (prefix-cached free blocks included).",
              lambda: aengine.stats[2])
        gauge("lowbit_kv_blocks_used", "KV-cache blocks held by requests.",
              lambda: aengine.stats[3] - aengine.stats[2])
        gauge("lowbit_kv_invariant_checks", "Block-manager consistency checks run while idle (--check-invariants).",
              lambda: aengine.stats[4])
        gauge("lowbit_kv_invariant_failures", "Block-manager consistency checks that failed.",
              lambda: aengine.stats[5])
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "Prompt tokens of accepted requests.",
                                     registry=r)
        self.generation_tokens = Counter("lowbit_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lowbit_inter_token_latency_seconds", "Time between a completion's tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.finished = Counter("lowbit_request_finished", "Finished completions by finish reason.",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("lowbit_request_rejected", "Requests answered with an error, by HTTP status.",
                                ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
