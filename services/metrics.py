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
        self.dropped = Counter("dpbus_gateway_dropped_answers",
                               "answers on the gateway's inbox passed to no HTTP client, by reason (wrong_rid: "
                               "not the rid of the call its subject belongs to; no_call: the call had ended)",
                               ["reason"], registry=r)
        self.aborts = Counter("dpbus_gateway_aborts", "requests the gateway aborted on the bus, by reason "
                              "(client_gone, timeout) and result (found, not_found, failed)",
                              ["reason", "result"], registry=r)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PublisherMetrics:
    """Latencies a publisher sees, per DP group."""

    def __init__(self, registry: CollectorRegistry, dp_rank: int) -> None:
        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["dp_rank"], buckets=buckets, registry=registry).labels(str(dp_rank))

        self.queue = hist("dpbus_publisher_queue_seconds", "accepted by ingest -> first scheduled", LATENCY)
        self.ttft = hist("dpbus_publisher_time_to_first_token_seconds", "accepted by ingest -> first token", LATENCY)
        self.itl = hist("dpbus_publisher_inter_token_seconds", "between two tokens of a request", INTER_TOKEN)
        self.step = hist("dpbus_publisher_step_seconds", "a step: publish -> every acknowledgement", INTER_TOKEN)
        self.delivery = hist("dpbus_publisher_delivery_seconds", "a step's time not spent computing (the bus)",
                             INTER_TOKEN)


class StatsCollector:
    """Exposes a service's micro stats (the dict ``stats()`` returns) at scrape time:
    numbers become gauges (names in ``levels``) or counters, dicts of numbers one family
    with a ``key`` label. ``stats`` runs on the service's event loop, never in the
    scraping thread."""

    def __init__(self, service: str, stats, loop, labels: dict[str, str], levels: set[str]) -> None:
        self.service, self.stats, self.loop, self.labels, self.levels = service, stats, loop, labels, levels

    def _snapshot(self) -> dict:
        import asyncio

        async def read() -> dict:
            return self.stats()

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(timeout=5)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            stats = self._snapshot()
        except Exception:  # noqa: BLE001 - the service is stopping: nothing to report
            return
        names, values = list(self.labels), list(self.labels.values())
        for key, value in stats.items():
            name = f"dpbus_{self.service}_{key}"
            kind = GaugeMetricFamily if key in self.levels else CounterMetricFamily
            if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
                continue
            if isinstance(value, dict):
                numbers = {str(k): v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                if value and not numbers:
                    continue  # not a dict of numbers (an empty one still declares its family)
                family = kind(name, f"{self.service} {key}, by key", labels=[*names, "key"])
                for k, v in numbers.items():
                    family.add_metric([*values, k], v)
            else:
                family = kind(name, f"{self.service} {key}", labels=names)
                family.add_metric(values, value)
            yield family


# stats that are levels (gauges); every other number is a running count (counter)
LEVELS = {"waiting", "running", "free_pages", "cached_pages", "epoch", "inflight", "held", "compiled_now", "compiled_at_warmup",
          "last_seq"}


def serve(port: int, host: str, registry: CollectorRegistry) -> None:
    """Serve ``registry`` for Prometheus on ``host:port`` (a daemon thread)."""
    from prometheus_client import ProcessCollector, start_http_server

    ProcessCollector(registry=registry)  # process_start_time_seconds tells restarts apart
    start_http_server(port, addr=host, registry=registry)
