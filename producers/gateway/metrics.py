"""The gateway's Prometheus metrics, under the same conventions as the
worker's (sluice_ prefix, seconds, _total counters) on its /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_POW2 = tuple(float(2**i) for i in range(12))


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.calls = Counter(
            "sluice_gateway_requests_total",
            "HTTP calls answered, by route and status code.",
            ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "sluice_gateway_request_seconds",
            "Time from a call's arrival to its answer (to its last event when streamed), by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inputs = Histogram(
            "sluice_gateway_call_inputs", "Inputs per call, by route.", ["route"], buckets=_POW2, registry=r
        )
        self.in_flight = Gauge("sluice_gateway_in_flight", "Calls being answered now.", registry=r)
        self.pending = Gauge(
            "sluice_gateway_pending_inputs", "Inputs sent to Kafka and waiting for results.", registry=r
        )
        self.rejections = Counter(
            "sluice_gateway_rejections_total",
            "Calls refused or failed before their results: unauthorized, invalid, too_large, backlog, in_flight, "
            "timeout, and the workers' and admission's codes (rate_limited, expired, ...).",
            ["reason"],
            registry=r,
        )
        self.backlog = Gauge(
            "sluice_gateway_workers_lag_records",
            "The workers' lag on PREFIX.requests, as the gateway last read it.",
            registry=r,
        )
        self.overloaded = Gauge("sluice_gateway_overloaded", "1 while the backlog refuses new calls.", registry=r)
        self.reader_restarts = Gauge(
            "sluice_gateway_reader_restarts", "Times the reply topic's reader failed and was started again.", registry=r
        )
