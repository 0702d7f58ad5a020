"""Process-local request counters, token counters and latency histograms, exposed through prometheus_client.

Each gateway process exposes its own numbers; Prometheus sums across processes. The ledger in the database,
not these counters, is the source of truth for billing. Every Metrics owns its CollectorRegistry (never the
library's global one), so several apps in one process (the tests build many) keep separate numbers; GET /metrics
serves `generate_latest(metrics.registry)`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # prometheus_client appends "_total" to a counter's samples itself; naming the counter with the suffix
        # already there gives the same family, so the exposed names stay cumulo_requests_total and so on.
        self.requests = Counter(
            "cumulo_requests_total",
            "Requests by model, endpoint and final status.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "cumulo_tokens_total",
            "Tokens processed, by model and kind (prompt or completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cumulo_requests_in_flight", "Requests this process is serving now.", registry=self.registry
        )
        self.ttft = Histogram(
            "cumulo_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "cumulo_request_duration_seconds",
            "Whole request, arrival to last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        # The edge fleet (docs/edge.md): device messages refused, by reason (malformed, unauthorized, topic,
        # failed), and webhook delivery attempts by outcome (delivered, retried, failed).
        self.edge_refused = Counter(
            "cumulo_edge_messages_refused_total",
            "Edge device messages refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.edge_webhooks = Counter(
            "cumulo_edge_webhook_deliveries_total",
            "Edge webhook delivery attempts, by outcome.",
            ["outcome"],
            registry=self.registry,
        )

    def started(self) -> None:
        self.in_flight.inc()

    def finished(
        self,
        *,
        model: str,
        endpoint: str,
        status: str,
        prompt: int,
        completion: int,
        ttft: float | None,
        e2e: float | None,
    ) -> None:
        self.in_flight.dec()
        self.requests.labels(model=model, endpoint=endpoint, status=status).inc()
        self.tokens.labels(model=model, kind="prompt").inc(prompt)
        self.tokens.labels(model=model, kind="completion").inc(completion)
        if ttft is not None:
            self.ttft.labels(model=model).observe(ttft)
        if e2e is not None:
            self.e2e.labels(model=model).observe(e2e)

    def refused(self, *, endpoint: str, code: str) -> None:
        """A request turned away at admission: counted under model "" with the error code as its status."""
        self.requests.labels(model="", endpoint=endpoint, status=code).inc()
