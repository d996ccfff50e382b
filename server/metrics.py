"""Every Prometheus metric of the reward server, in one place.

All names share the prefix `grm_serve_`; every metric is documented; labels are bounded (method
names from the proto, gRPC status code names, batch kinds, job outcomes). The engine emits plain
stats objects (server/engine/base.py); `ServerMetrics` subscribes to them and is the only code
that touches prometheus_client. Each server gets its own registry, so tests can run several.

    >>> m = ServerMetrics()
    >>> m.observe_rpc("Score", "OK", 0.01)
    >>> b"grm_serve_requests_total" in m.exposition()
    True
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

from .engine.base import BatchStats, EngineInfo, JobStats, StatsSinks
from .engine.prefix_cache import PrefixStats

PREFIX = "grm_serve"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServerMetrics:
    """The server's metrics on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "RPCs finished, by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram(f"{PREFIX}_request_seconds", "Total RPC latency in seconds, by method.",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(f"{PREFIX}_queue_seconds", "Seconds a job waited in the batcher's queue.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(f"{PREFIX}_compute_seconds", "Seconds of model compute per forward pass.",
                                         ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram(f"{PREFIX}_batch_rows", "Sequences per forward pass.", ["kind"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(f"{PREFIX}_batch_tokens", "Real (unpadded) tokens per forward pass.", ["kind"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.padding_tokens = Counter(f"{PREFIX}_padding_tokens", "Padding tokens computed (wasted work).",
                                      registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth_pairs", "Pairs waiting in the batcher's queue.", registry=r)
        self.pairs = Counter(f"{PREFIX}_pairs_scored", "Pairs scored.", registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens_scored",
                              "Tokens of scored jobs (a ScoreCandidates prompt counted once), before prompt reuse.",
                              registry=r)
        self.jobs = Counter(f"{PREFIX}_jobs", "Jobs leaving the queue, by outcome (ok, expired, cancelled, error).",
                            ["outcome"], registry=r)
        self.prefix_lookups = Counter(f"{PREFIX}_prefix_cache_lookups",
                                      "Prefix KV cache lookups by result (hit: more than the template head reused).",
                                      ["result"], registry=r)
        self.prefix_evictions = Counter(f"{PREFIX}_prefix_cache_evictions",
                                        "Prefix KV segments evicted to stay in budget.", registry=r)
        self.prefix_reused = Counter(f"{PREFIX}_prefix_reused_tokens",
                                     "Tokens not recomputed: read from a cached or shared prefix state, or the "
                                     "template head.", registry=r)
        self.prefix_bytes = Gauge(f"{PREFIX}_prefix_cache_bytes", "Bytes of prefix KV states held.", registry=r)
        self.prefix_entries = Gauge(f"{PREFIX}_prefix_cache_entries",
                                    "Prefix KV segments held (runs of tokens between branch points).", registry=r)
        self.model_info = Info(f"{PREFIX}_model", "The model being served.", registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 while the server reports SERVING.", registry=r)
        self._http = None
        self._lock = threading.Lock()

    # -- sinks for engine stats ---------------------------------------------------------------
    def attach(self, sinks: StatsSinks) -> None:
        sinks.on_batch.append(self.on_batch)
        sinks.on_job.append(self.on_job)
        sinks.on_queue_depth.append(self.queue_depth.set)
        sinks.on_prefix.append(self.on_prefix)

    def on_batch(self, s: BatchStats) -> None:
        self.compute_seconds.labels(s.kind).observe(s.compute_seconds)
        self.batch_rows.labels(s.kind).observe(s.rows)
        self.batch_tokens.labels(s.kind).observe(s.tokens)
        self.padding_tokens.inc(max(0, s.padded_tokens - s.tokens))

    def on_prefix(self, s: PrefixStats, nbytes: int, entries: int) -> None:
        self.prefix_lookups.labels("hit").inc(s.hits)
        self.prefix_lookups.labels("miss").inc(s.misses)
        self.prefix_evictions.inc(s.evictions)
        self.prefix_reused.inc(s.reused_tokens)
        self.prefix_bytes.set(nbytes)
        self.prefix_entries.set(entries)

    def on_job(self, s: JobStats) -> None:
        self.jobs.labels(s.outcome).inc()
        self.queue_seconds.observe(s.queue_seconds)
        if s.outcome == "ok":
            self.pairs.inc(s.pairs)
            self.tokens.inc(s.tokens)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)

    def set_model(self, info: EngineInfo, server_version: str) -> None:
        self.model_info.info({"name": info.model_name, "version": info.model_version, "precision": info.precision,
                              "format": info.checkpoint_format, "device": info.device,
                              "server_version": server_version})

    # -- exposition ---------------------------------------------------------------------------
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port."""
        with self._lock:
            httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
            self._http = httpd
            return httpd.server_port

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
                self._http = None
