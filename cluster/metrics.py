"""Prometheus metrics of the gRPC server: request outcomes, tokens and latencies counted as
requests pass through it, and each engine's state read from the engines at scrape time."""

from __future__ import annotations

import hmac
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from goodspec.scheduler.stats import EngineStats

# Seconds: TTFT on this CPU box is tens of ms; a loaded GPU server's requests run for minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector(Collector):
    """Engine gauges from `stats()` (one EngineStats per engine, as EngineGroup.stats gives) at each
    scrape: the engines own that state, so it is read, never mirrored."""

    def __init__(self, stats: Callable[[], list[EngineStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self._stats()
        families = {
            "running": GaugeMetricFamily("goodspec_engine_running_requests", "requests decoding or prefilling", labels=["replica"]),
            "waiting": GaugeMetricFamily("goodspec_engine_waiting_requests", "requests admitted to no batch yet", labels=["replica"]),
            "kv": GaugeMetricFamily("goodspec_engine_kv_blocks_used", "KV cache blocks held", labels=["replica", "worker"]),
            "mean_k": GaugeMetricFamily("goodspec_engine_mean_k", "mean draft tokens per decoding request-step, recent steps", labels=["replica"]),
            "accept": GaugeMetricFamily("goodspec_engine_acceptance_rate", "accepted / proposed draft tokens, recent steps", labels=["replica"]),
            "fail": GaugeMetricFamily("goodspec_engine_worker_failures", "worker calls that failed since the engine started", labels=["replica"]),
            "healthy": GaugeMetricFamily("goodspec_engine_healthy", "1 while the engine can serve", labels=["replica"]),
        }
        for s in rows:
            r = str(s.replica)
            families["running"].add_metric([r], s.running)
            families["waiting"].add_metric([r], s.waiting)
            families["kv"].add_metric([r, "target"], s.target_blocks_used)
            families["kv"].add_metric([r, "draft"], s.draft_blocks_used)
            families["mean_k"].add_metric([r], s.mean_k)
            if s.acceptance_rate is not None:
                families["accept"].add_metric([r], s.acceptance_rate)
            families["fail"].add_metric([r], s.worker_failures)
            families["healthy"].add_metric([r], 0 if s.unhealthy else 1)
        yield from families.values()


def _bearer_only(app, token: str):
    expected = f"Bearer {token}".encode()

    def guarded(environ, start_response):
        got = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
        if not hmac.compare_digest(got, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b"missing or wrong bearer token\n"]
        return app(environ, start_response)

    return guarded


class ServerMetrics:
    """What the servicer records per request; served over HTTP by `serve`."""

    def __init__(self, engine_stats: Callable[[], list[EngineStats]]) -> None:
        self.registry = CollectorRegistry()
        self._http = None
        self.requests = Counter("goodspec_requests", "requests by how they ended",
                                ["outcome"], registry=self.registry)
        self.in_flight = Gauge("goodspec_requests_in_flight", "requests admitted and not ended",
                               registry=self.registry)
        self.tokens = Counter("goodspec_generated_tokens", "completion tokens streamed to clients",
                              registry=self.registry)
        self.ttft = Histogram("goodspec_time_to_first_token_seconds", "admission to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("goodspec_request_latency_seconds", "admission to last token, finished requests",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        for outcome in ("finished", "cancelled", "rejected", "failed"):
            self.requests.labels(outcome)  # present at 0 from the start, as dashboards expect
        self.registry.register(_EngineCollector(engine_stats))

    def serve(self, host: str, port: int, token: str | None = None) -> int:
        """Start the /metrics HTTP endpoint on its own thread; returns the bound port. With a
        `token`, a scrape must send `Authorization: Bearer <token>` (else 401)."""
        import threading
        from wsgiref.simple_server import make_server

        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

        app = make_wsgi_app(self.registry)
        if token is not None:
            app = _bearer_only(app, token)
        # prometheus_client's start_http_server has no hook for auth: the same server, built here.
        self._http = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
        threading.Thread(target=self._http.serve_forever, name="goodspec-metrics", daemon=True).start()
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
