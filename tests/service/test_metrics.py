"""GET /metrics read the way Prometheus reads it: parsed with prometheus_client's own text parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.service.support import auth


def _samples(service) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics keyed by (sample name, label set), as a scraper would store it."""
    r = service.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _labels(**pairs: str) -> frozenset:
    return frozenset(pairs.items())


def test_a_completed_request_moves_the_request_token_and_latency_series_by_its_own_amounts(make_service):
    service = make_service()
    model = _labels(model="fake-model")
    before = _samples(service)
    r = service.client.post(
        "/v1/completions",
        headers=auth(service.key()),
        json={"model": "fake-model", "prompt": "xyz", "max_tokens": 3},
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 3 and usage["prompt_tokens"] > 0
    after = _samples(service)

    def moved(name: str, labels: frozenset) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    completed = _labels(model="fake-model", endpoint="completions", status="completed")
    assert moved("cumulo_requests_total", completed) == 1
    assert moved("cumulo_tokens_total", _labels(model="fake-model", kind="prompt")) == usage["prompt_tokens"]
    assert moved("cumulo_tokens_total", _labels(model="fake-model", kind="completion")) == 3
    assert moved("cumulo_time_to_first_token_seconds_count", model) == 1
    assert moved("cumulo_request_duration_seconds_count", model) == 1
    # every observation falls in the +Inf bucket, so it counts exactly what _count counts
    inf = _labels(model="fake-model", le="+Inf")
    assert (
        after[("cumulo_request_duration_seconds_bucket", inf)]
        == after[("cumulo_request_duration_seconds_count", model)]
    )
    assert after[("cumulo_requests_in_flight", frozenset())] == 0


def test_a_request_refused_at_admission_is_counted_under_its_error_code(make_service):
    service = make_service()
    h = auth(service.key(plan="one-a-minute", rpm=1))
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 1}
    assert service.client.post("/v1/completions", headers=h, json=body).status_code == 200
    refused = service.client.post("/v1/completions", headers=h, json=body)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    code = error["code"] or error["type"]
    samples = _samples(service)
    assert samples[("cumulo_requests_total", _labels(model="", endpoint="completions", status=code))] == 1
    assert samples[("cumulo_requests_in_flight", frozenset())] == 0


def test_each_app_counts_only_its_own_requests(make_service):
    busy, idle = make_service(), make_service()
    r = busy.client.post(
        "/v1/completions",
        headers=auth(busy.key()),
        json={"model": "fake-model", "prompt": "x", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert _samples(busy)[("cumulo_tokens_total", _labels(model="fake-model", kind="completion"))] == 2
    assert not [key for key in _samples(idle) if key[0] in ("cumulo_requests_total", "cumulo_tokens_total")]
