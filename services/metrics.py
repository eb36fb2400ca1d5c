"""Prometheus metrics (prometheus-client), one registry per service so that a process
running several services (``dpbus node``) can serve each set apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: a first token takes milliseconds to minutes (a long queue); a token tens of ms
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
INTER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dpbus_gateway_requests", "HTTP requests by endpoint and outcome (HTTP status)",
                                ["endpoint", "status"], registry=r)
        self.inflight = Gauge("dpbus_gateway_inflight_requests", "HTTP requests being served", registry=r)
        self.ttft = Histogram("dpbus_gateway_time_to_first_token_seconds", "request received -> first answer",
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("dpbus_gateway_inter_token_seconds", "time between two streamed chunks",
                             buckets=INTER_TOKEN, registry=r)
        self.e2e = Histogram("dpbus_gateway_request_seconds", "request received -> terminal answer",
                             buckets=LATENCY, registry=r)
        self.tokens = Counter("dpbus_gateway_tokens", "prompt and completion tokens served", ["kind"], registry=r)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
