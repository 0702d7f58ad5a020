"""Process-local counters and histograms rendered in the Prometheus text format (no client library needed).

Each gateway process exposes its own numbers; Prometheus sums across processes. The ledger in the database,
not these counters, is the source of truth for billing.
"""

from __future__ import annotations

import threading
from collections import defaultdict

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(_LATENCY_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(_LATENCY_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.tokens: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.ttft: dict[tuple[tuple[str, str], ...], Histogram] = defaultdict(Histogram)
        self.e2e: dict[tuple[tuple[str, str], ...], Histogram] = defaultdict(Histogram)
        self.in_flight = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

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
        with self._lock:
            self.in_flight -= 1
            self.requests[(("model", model), ("endpoint", endpoint), ("status", status))] += 1
            self.tokens[(("model", model), ("kind", "prompt"))] += prompt
            self.tokens[(("model", model), ("kind", "completion"))] += completion
            if ttft is not None:
                self.ttft[(("model", model),)].observe(ttft)
            if e2e is not None:
                self.e2e[(("model", model),)].observe(e2e)

    def refused(self, *, endpoint: str, code: str) -> None:
        with self._lock:
            self.requests[(("model", ""), ("endpoint", endpoint), ("status", code))] += 1

    def render(self) -> str:
        with self._lock:
            out: list[str] = []
            out += [
                "# HELP cumulo_requests_total Requests by model, endpoint and final status.",
                "# TYPE cumulo_requests_total counter",
            ]
            out += [f"cumulo_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
            out += [
                "# HELP cumulo_tokens_total Tokens processed, by model and kind (prompt or completion).",
                "# TYPE cumulo_tokens_total counter",
            ]
            out += [f"cumulo_tokens_total{_labels(k)} {v}" for k, v in sorted(self.tokens.items())]
            out += [
                "# HELP cumulo_requests_in_flight Requests this process is serving now.",
                "# TYPE cumulo_requests_in_flight gauge",
                f"cumulo_requests_in_flight {self.in_flight}",
            ]
            for name, help_text, data in (
                ("cumulo_time_to_first_token_seconds", "Time to first token.", self.ttft),
                ("cumulo_request_duration_seconds", "Whole request, arrival to last token.", self.e2e),
            ):
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                for key, hist in sorted(data.items()):
                    for bound, count in zip(_LATENCY_BUCKETS, hist.counts, strict=True):
                        out.append(f"{name}_bucket{_labels(key + (('le', str(bound)),))} {count}")
                    out.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {hist.total}")
                    out.append(f"{name}_sum{_labels(key)} {hist.sum}")
                    out.append(f"{name}_count{_labels(key)} {hist.total}")
            return "\n".join(out) + "\n"
