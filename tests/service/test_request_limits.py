"""The boundary of the gateway: values the code cannot hold, lists and maps without limits, references to things
that do not exist, and filters that do not parse are all a 400 in OpenAI's error shape, never a 500 and never
silently ignored. The engine is `StrictEngine`, which fails where a real model fails."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cumulo.contracts import SamplingParams
from cumulo.errors import InvalidRequest
from tests.service.strict_engine import StrictEngine
from tests.service.support import auth

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 3}


def post(service: Any, path: str, body: dict, key: str) -> Any:
    """Sends `body` as a hostile client would: ASCII JSON whose escapes may spell lone surrogates."""
    content = json.dumps(body, ensure_ascii=True).encode()
    headers = {**auth(key), "content-type": "application/json"}
    return service.client.post(path, headers=headers, content=content)


def refused(response: Any, param: str | None, *words: str) -> dict:
    """Asserts a 400 in OpenAI's error shape naming `param`, whose message holds `words`; returns the error."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


@pytest.fixture
def strict(make_service):
    engine = StrictEngine(MODEL)
    service = make_service({MODEL: engine})
    return service, engine, service.key()


def test_a_lone_surrogate_in_a_chat_message_is_a_400_before_the_tokenizer(strict):
    service, engine, key = strict
    for content in ("\ud800", "ok \udfff", [{"type": "text", "text": "a\ud800"}]):
        r = post(
            service, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": content}]}, key
        )
        refused(r, "messages.0.content" if isinstance(content, str) else "messages.0.content.0.text")
    assert engine.started == []
    assert post(service, "/v1/chat/completions", CHAT, key).status_code == 200


def test_a_lone_surrogate_in_a_completion_prompt_is_a_400_before_the_tokenizer(strict):
    service, engine, key = strict
    for prompt, param in (("\ud800", "prompt"), (["fine", "x\udbffy"], "prompt.1")):
        refused(post(service, "/v1/completions", {**COMPLETION, "prompt": prompt}, key), param)
    assert engine.started == []
    assert post(service, "/v1/completions", COMPLETION, key).status_code == 200


def test_a_lone_surrogate_anywhere_else_is_a_400_and_the_error_is_valid_json(strict):
    service, _, key = strict
    refused(post(service, "/v1/completions", {**COMPLETION, "model": "\ud800"}, key), "model")
    refused(post(service, "/v1/completions", {**COMPLETION, "user": "\ud800"}, key), "user")
    # A map key is part of the error's location; the message must still encode as UTF-8.
    r = post(service, "/v1/completions", {**COMPLETION, "logit_bias": {"\ud800": 1}}, key)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias")
    r = post(service, "/v1/labels/verify", {"text": "hi", "label": {"signature": "x", "note": "\ud800"}}, key)
    refused(r, "label")


def test_a_seed_beyond_64_bits_is_a_400_and_the_largest_one_is_honoured(strict):
    service, engine, key = strict
    for seed in (2**64, 2**63, -(2**63) - 1, 10**30):
        refused(post(service, "/v1/completions", {**COMPLETION, "seed": seed}, key), "seed")
    assert engine.started == []
    # OpenAI's range is signed 64 bits; with n = 2 the second choice runs with seed + 1, which the engine takes.
    r = post(service, "/v1/completions", {**COMPLETION, "seed": 2**63 - 1, "n": 2}, key)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_sampling_params_refuse_a_seed_no_generator_can_take():
    SamplingParams(seed=2**64 - 1).validate()
    SamplingParams(seed=-(2**63)).validate()
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(InvalidRequest, match="seed"):
            SamplingParams(seed=seed).validate()


def test_stop_takes_at_most_four_short_strings(strict):
    service, _, key = strict
    refused(
        post(service, "/v1/completions", {**COMPLETION, "stop": ["x"] * 10_000}, key), "stop", "at most 4"
    )
    refused(post(service, "/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, key), "stop")
    refused(post(service, "/v1/chat/completions", {**CHAT, "stop": "x" * 257}, key), "stop")
    r = post(service, "/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "q"], "max_tokens": 8}, key)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"


def test_logit_bias_is_bounded_checked_against_the_vocabulary_then_refused_not_ignored(strict):
    service, engine, key = strict
    vocab = engine.tokenizer.vocab_size
    big = {str(i): 1 for i in range(200_000)}
    refused(post(service, "/v1/completions", {**COMPLETION, "logit_bias": big}, key), "logit_bias", "300")
    refused(post(service, "/v1/completions", {**COMPLETION, "logit_bias": {"5": 101}}, key), "logit_bias.5")
    refused(post(service, "/v1/completions", {**COMPLETION, "logit_bias": {"-1": 1}}, key), "logit_bias.-1")
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        r = post(service, path, {**body, "logit_bias": {"5": 1, str(vocab + 7): -100}}, key)
        refused(r, "logit_bias", f"token id {vocab + 7}", f"{vocab} tokens")
        refused(post(service, path, {**body, "logit_bias": {"5": 1}}, key), "logit_bias", "not supported")
        assert post(service, path, {**body, "logit_bias": {}}, key).status_code == 200
    assert len(engine.started) == 2  # only the two requests without a bias reached the engine


def test_lists_strings_and_numbers_have_limits(strict):
    service, _, key = strict
    many = [{"role": "user", "content": "x"}] * 2049
    refused(post(service, "/v1/chat/completions", {**CHAT, "messages": many}, key), "messages", "2048")
    refused(post(service, "/v1/chat/completions", {**CHAT, "n": 129}, key), "n")
    refused(post(service, "/v1/chat/completions", {**CHAT, "n": 17}, key), "n", "at most 16")
    refused(post(service, "/v1/chat/completions", {**CHAT, "user": "u" * 257}, key), "user")
    refused(post(service, "/v1/completions", {**COMPLETION, "prompt": ["x"] * 65}, key), "prompt")
    refused(post(service, "/v1/completions", {**COMPLETION, "logprobs": 21}, key), "logprobs")
    refused(
        post(service, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, key),
        "top_logprobs",
    )
    # NaN and Infinity are not JSON, but Python's parser takes them.
    for name, value in (("temperature", "NaN"), ("repetition_penalty", "Infinity")):
        content = json.dumps(COMPLETION).replace('"max_tokens"', f'"{name}": {value}, "max_tokens"').encode()
        r = service.client.post(
            "/v1/completions", headers={**auth(key), "content-type": "application/json"}, content=content
        )
        refused(r, name, "finite")


def test_fields_no_engine_can_honour_are_refused_not_ignored(strict):
    service, engine, key = strict
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    for field, value in (
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_schema"}),
        ("top_logprobs", 3),  # without logprobs: true
    ):
        refused(
            post(service, "/v1/chat/completions", {**CHAT, field: value}, key),
            field,
            "logprobs" if field == "top_logprobs" else "not supported",
        )
    r = post(service, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": image}]}, key)
    refused(r, "messages.0.content.0.type", "only text", "image_url")
    for field, value in (("best_of", 3), ("suffix", "tail"), ("echo", True)):
        refused(post(service, "/v1/completions", {**COMPLETION, field: value}, key), field, "not supported")
    assert engine.started == []
    # What asks for nothing is still accepted, as OpenAI clients send it.
    fine = {**CHAT, "tools": [], "tool_choice": "auto", "response_format": {"type": "text"}}
    assert post(service, "/v1/chat/completions", fine, key).status_code == 200
    assert (
        post(service, "/v1/completions", {**COMPLETION, "best_of": 1, "echo": False}, key).status_code == 200
    )


def test_usage_filters_that_do_not_parse_are_refused_not_ignored(strict):
    service, _, key = strict
    assert post(service, "/v1/completions", COMPLETION, key).status_code == 200
    h = auth(key)
    r = service.client.get("/v1/usage?start=yesterday", headers=h)
    refused(r, "start", "unknown query parameter", "start_time")
    refused(service.client.get("/v1/usage?start_time=yesterday", headers=h), "start_time")
    for query, param in (
        ("start_time=nan", "start_time"),
        ("end_time=inf", "end_time"),
        ("start_time=-1", "start_time"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("after=-5", "after"),
        ("after=0", "after"),
        (f"after={2**70}", "after"),
        (f"after={2**31}", "after"),
    ):
        refused(service.client.get(f"/v1/usage?{query}", headers=h), param)
    r = service.client.get("/v1/usage?start_time=0&end_time=4000000000&limit=5&after=1000", headers=h)
    assert r.status_code == 200 and r.json()["totals"]["requests"] == 1
    future = service.client.get("/v1/usage?start_time=4000000000", headers=h)
    assert future.status_code == 200 and future.json()["data"] == []


def test_admin_filters_and_bodies_have_limits(strict):
    service, _, _ = strict
    h = auth(service.admin_key())
    refused(service.client.get("/admin/usage?orgg=acme", headers=h), "orgg", "org, start_time")
    refused(service.client.get("/admin/keys?organisation=acme", headers=h), "organisation")
    refused(service.client.get(f"/admin/usage?after={2**63}", headers=h), "after")
    refused(service.client.post(f"/admin/keys/{2**70}/revoke", headers=h), "key_id")
    assert service.client.post(f"/admin/keys/{2**31 - 1}/revoke", headers=h).status_code == 404
    for body, param in (
        ({"name": "p", "rpm": 2**31}, "rpm"),
        ({"name": "p", "monthly_tokens": 2**63}, "monthly_tokens"),
        ({"name": "p", "price_in": 1e300}, "price_in"),
        # a per-model price must be [in, out]: anything else would fail every request on the plan
        ({"name": "p", "model_prices": {MODEL: [1.0]}}, f"model_prices.{MODEL}"),
        ({"name": "p", "models": ["m"] * 257}, "models"),
        ({"name": "p\x00"}, "name"),
    ):
        refused(post(service, "/admin/plans", body, h["Authorization"].split()[1]), param)
    for body, param in (
        ({"org": "acme\x00"}, "org"),
        ({"org": "acme", "user": "u" * 257}, "user"),
        ({"org": "acme", "name": "k" * 129}, "name"),
        ({"org": "acme", "expires_at": 1e30}, "expires_at"),
    ):
        refused(post(service, "/admin/keys", body, h["Authorization"].split()[1]), param)
    assert service.client.get("/admin/usage?org=nobody", headers=h).status_code == 404


def test_the_models_tokenizer_refuses_text_that_is_not_unicode_with_a_clear_error():
    # The gateway checks first; the CLI reaches the tokenizer directly (an undecodable byte in argv becomes one).
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from cumulo.models.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(backend, bos_token_id=None, eos_token_ids=set(), chat_template=None)
    assert tokenizer.encode("hi hi") == [1, 1]
    with pytest.raises(InvalidRequest, match="lone surrogate at character 3"):
        tokenizer.encode("hi \ud800")


def test_an_idempotency_key_of_the_other_endpoint_is_a_409_streamed_or_not(strict):
    service, _, key = strict
    h = {**auth(key), "Idempotency-Key": "once"}
    assert service.client.post("/v1/completions", headers=h, json=COMPLETION).status_code == 200
    for stream in (True, False):
        r = service.client.post("/v1/chat/completions", headers=h, json={**CHAT, "stream": stream})
        assert r.status_code == 409 and "text_completion" in r.json()["error"]["message"]
    again = service.client.post("/v1/completions", headers=h, json=COMPLETION)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    refused(
        service.client.post("/v1/completions", headers={**h, "Idempotency-Key": "a\x01b"}, json=COMPLETION),
        "idempotency-key",
    )


def _unlimited(node: Any, components: dict, where: str) -> list[str]:
    """Where a JSON schema lets a string, a list or a map grow without limit."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _unlimited(components[name], components, f"{where}<{name}>")
    found = []
    for key in ("anyOf", "oneOf", "allOf"):
        for option in node.get(key, ()):
            found += _unlimited(option, components, where)
    kind = node.get("type")
    if kind == "string" and "maxLength" not in node and "enum" not in node:
        found.append(where)
    if kind == "array":
        if "maxItems" not in node:
            found.append(where)
        found += _unlimited(node.get("items", {}), components, f"{where}[]")
    if kind == "object":
        if node.get("additionalProperties") and "maxProperties" not in node:
            found.append(where)
        for name, inner in node.get("properties", {}).items():
            found += _unlimited(inner, components, f"{where}.{name}")
        if isinstance(node.get("additionalProperties"), dict):
            found += _unlimited(node["additionalProperties"], components, f"{where}{{}}")
    return found


def test_every_string_list_and_map_a_request_can_send_has_a_limit(strict):
    # A limit on a string also makes pydantic read it as UTF-8, which is what refuses lone surrogates.
    service, _, _ = strict
    raw = service.client.app.openapi()
    components = raw["components"]["schemas"]
    found = []
    for path, methods in raw["paths"].items():
        for method, spec in methods.items():
            where = f"{method.upper()} {path}"
            for parameter in spec.get("parameters", ()):
                found += _unlimited(parameter["schema"], components, f"{where} {parameter['name']}")
            body = spec.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body:
                found += _unlimited(body["schema"], components, f"{where} body")
    assert found == []
