"""The OpenAI-compatible endpoints against a fake engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from tests.service.fakes import PHRASE, FakeEngine
from tests.service.support import auth


def _events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_lists_served_models_with_their_seal(make_service):
    service = make_service()
    r = service.client.get("/v1/models", headers=auth(service.key()))
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == "fake-model" and card["seal"].startswith("sha256:") and card["max_model_len"] == 256


def test_chat_completion_returns_text_usage_and_a_verifiable_label(make_service):
    service = make_service()
    r = service.client.post(
        "/v1/chat/completions",
        headers=auth(service.key()),
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == PHRASE[:9]
    assert choice["finish_reason"] == "length"
    prompt_len = len("<|user|>hi\n<|assistant|>")
    assert body["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": 9,
        "total_tokens": prompt_len + 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert r.headers["X-Cumulo-Label"]
    check = service.client.post(
        "/v1/labels/verify", json={"text": choice["message"]["content"], "label": choice["label"]}
    )
    assert check.json()["valid"] is True
    tampered = service.client.post(
        "/v1/labels/verify", json={"text": choice["message"]["content"] + "!", "label": choice["label"]}
    )
    assert tampered.json()["valid"] is False


def test_chat_stream_sends_deltas_then_usage_then_done(make_service):
    service = make_service()
    with service.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=auth(service.key()),
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200
        events = _events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == PHRASE[:5]
    last = events[-3]["choices"][0]
    assert last["finish_reason"] == "length" and last["label"]["content_sha256"]


def test_completion_honours_stop_seed_n_and_logprobs(make_service):
    service = make_service()
    r = service.client.post(
        "/v1/completions",
        headers=auth(service.key()),
        json={
            "model": "fake-model",
            "prompt": "abc",
            "max_tokens": 30,
            "stop": ["fox"],
            "n": 2,
            "seed": 4,
            "logprobs": 2,
        },
    )
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    assert first["text"] == PHRASE[4:16]  # "quick brown " then the stop string
    assert first["finish_reason"] == "stop"
    assert second["index"] == 1 and second["text"] != first["text"]
    assert len(first["logprobs"]["top_logprobs"][0]) == 2
    assert r.json()["usage"]["prompt_tokens"] == 4  # BOS + "abc", billed once for n=2


def test_pinned_seal_must_match_the_served_model(make_service):
    service = make_service()
    key = service.key()
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
    ok = service.client.post(
        "/v1/completions", headers=auth(key), json={**body, "seal": "sha256:" + "ab" * 32}
    )
    assert ok.status_code == 200
    r = service.client.post("/v1/completions", headers=auth(key), json={**body, "seal": "sha256:00"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_seal_mismatch"


def test_bad_requests_get_openai_shaped_4xx(make_service):
    service = make_service(engines={"fake-model": FakeEngine(max_model_len=32)}, max_body_bytes=10_000)
    h = auth(service.key())
    cases = [
        (
            service.client.post(
                "/v1/completions", headers={**h, "content-type": "application/json"}, content=b"{not json"
            ),
            400,
            None,
        ),
        (
            service.client.post(
                "/v1/completions",
                headers=h,
                json={"model": "fake-model", "prompt": "x", "max_tokens": "many"},
            ),
            400,
            None,
        ),
        (service.client.post("/v1/completions", headers=h, json={"prompt": "x"}), 400, None),
        (
            service.client.post("/v1/completions", headers=h, json={"model": "nope", "prompt": "x"}),
            404,
            "model_not_found",
        ),
        (
            service.client.post(
                "/v1/completions", headers=h, json={"model": "fake-model", "prompt": "y" * 40}
            ),
            400,
            "context_length_exceeded",
        ),
        (
            service.client.post(
                "/v1/completions", headers=h, json={"model": "fake-model", "prompt": "y" * 20_000}
            ),
            413,
            "request_too_large",
        ),
        (
            service.client.post("/v1/completions", json={"model": "fake-model", "prompt": "x"}),
            401,
            "invalid_api_key",
        ),
        (service.client.get("/v1/nothing-here", headers=h), 404, "not_found"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"]
        if code:
            assert error["code"] == code
    after = service.client.post("/v1/completions", headers=h, json={"model": "fake-model", "prompt": "x"})
    assert after.status_code == 200


def test_health_and_metrics_report_the_service(make_service):
    service = make_service()
    service.client.post(
        "/v1/completions",
        headers=auth(service.key()),
        json={"model": "fake-model", "prompt": "x", "max_tokens": 3},
    )
    assert service.client.get("/health").json()["status"] == "ok"
    text = service.client.get("/metrics").text
    assert 'cumulo_requests_total{endpoint="completions",model="fake-model",status="completed"} 1' in text
    assert 'cumulo_tokens_total{kind="completion",model="fake-model"} 3' in text


def test_chat_logprobs_and_user_are_returned_and_recorded(make_service):
    service = make_service()
    key = service.key()
    r = service.client.post(
        "/v1/chat/completions",
        headers=auth(key),
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 3,
            "user": "end-user-7",
        },
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["T", "h"] and len(content[0]["top_logprobs"]) == 3
    assert service.client.get("/v1/usage", headers=auth(key)).json()["data"][0]["user"] == "end-user-7"


def test_batch_and_token_id_prompts_each_get_choices_and_are_billed_once(make_service):
    service = make_service()
    r = service.client.post(
        "/v1/completions",
        headers=auth(service.key()),
        json={"model": "fake-model", "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "n": 2},
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 12,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_streamed_n_choices_each_finish_with_their_own_label(make_service):
    service = make_service()
    with service.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=auth(service.key()),
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "n": 3,
            "seed": 0,
            "stream": True,
        },
    ) as r:
        events = _events(r)
    finals = [e["choices"][0] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1, 2]
    texts = {
        i: "".join(
            e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"][0]["index"] == i
        )
        for i in range(3)
    }
    for final in finals:
        check = service.client.post(
            "/v1/labels/verify", json={"text": texts[final["index"]], "label": final["label"]}
        )
        assert check.json()["valid"], final["index"]


def test_single_model_card_and_unknown_model_card(make_service):
    service = make_service()
    h = auth(service.key())
    assert service.client.get("/v1/models/fake-model", headers=h).json()["id"] == "fake-model"
    assert service.client.get("/v1/models/ghost", headers=h).status_code == 404


class _RefusingEngine(FakeEngine):
    async def generate(self, prompt_token_ids, params, request_id=None):  # noqa: ANN001, ANN201
        from cumulo.errors import EngineOverloaded

        raise EngineOverloaded("no room in the KV cache")
        yield  # an async generator, like the real engine


def test_an_engine_refusal_is_an_http_error_even_when_streaming(make_service):
    service = make_service(engines={"fake-model": _RefusingEngine()})
    key = service.key()
    for stream in (False, True):
        r = service.client.post(
            "/v1/completions",
            headers=auth(key),
            json={"model": "fake-model", "prompt": "x", "max_tokens": 3, "stream": stream},
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_overloaded"
    rows = service.client.get("/v1/usage", headers=auth(key)).json()["data"]
    assert [row["status"] for row in rows] == ["error", "error"]
