"""Fuzzing the gateway over its own OpenAPI schema (schemathesis, in process, no network): whatever a client
sends, no answer is a 5xx, and every error is OpenAI's error JSON.

Schemathesis draws requests that fit the schema (positive) and requests that break it (negative). It never draws
what JSON can carry but the schema cannot describe, and that is where the hostile requests that once got a 500
came from, so each drawn request may also get one part replaced by such a value: a lone surrogate, a NUL, an
integer beyond 64 bits, NaN, a list or map far over any limit, or a query value that does not parse. The engine
is `StrictEngine`, which fails where a real model fails. Bounded and deterministic: a fixed number of examples per
operation, derandomized, no example database.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.service.strict_engine import StrictEngine
from tests.service.support import auth

MODEL = "fake-model"
GENERATION = {"POST /v1/chat/completions", "POST /v1/completions"}
EXAMPLES = {GenerationMode.POSITIVE: (40, 5), GenerationMode.NEGATIVE: (20, 5)}  # (generation, other)

# Values JSON can carry that code may not hold. A replacement keeps the type it replaces (so the request still
# gets past the checks of shape and reaches deeper code) or, less often, is any of them.
HOSTILE_BY_TYPE: dict[type, list[Any]] = {
    str: ["\ud800", "x\udfffy", "a\x00b", "", "x" * 5000],
    int: [2**64, -(2**63) - 1, 10**30, 2**31, -1, 0],
    float: [float("nan"), float("inf"), -float("inf"), 1e308, -0.0],
    bool: [False, True],
    list: [[], ["\ud800"], [2**64]],
    dict: [{}, {"99999999": 1}, {"\ud800": 1}],
}
HOSTILE_VALUES: list[Any] = [None, *(v for values in HOSTILE_BY_TYPE.values() for v in values)]
HOSTILE_QUERY = ["yesterday", "nan", "inf", "-1", "0", str(2**70), "1e400", "\x00", ""]

# A valid request per operation: what schemathesis draws is mostly refused by checks it cannot know of (the
# served model's name, the server's own limits), so half the hostile replacements start from one of these and
# reach the code behind the checks.
VALID: dict[str, tuple[dict | None, dict | None]] = {
    "POST /v1/chat/completions": (
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "be brief", "name": "s"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "max_tokens": 4,
            "n": 2,
            "stop": ["zz", "q"],
            "seed": 7,
            "temperature": 0.7,
            "top_p": 0.9,
            "logprobs": True,
            "top_logprobs": 2,
            "user": "u-1",
            "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {},
        },
        None,
    ),
    "POST /v1/completions": (
        {
            "model": MODEL,
            "prompt": ["ab", "cd"],
            "max_tokens": 4,
            "n": 2,
            "stop": "q",
            "seed": 7,
            "logprobs": 2,
            "user": "u-1",
            "ignore_eos": True,
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
        },
        None,
    ),
    "POST /v1/labels/verify": ({"text": "hi", "label": {"signature": "AAAA", "content_sha256": "00"}}, None),
    "POST /admin/plans": (
        {
            "name": "fuzz-plan",
            "rpm": 100,
            "concurrency": 2,
            "monthly_tokens": 10**6,
            "models": [MODEL],
            "price_in": 1.0,
            "model_prices": {MODEL: [0.5, 1.0]},
        },
        None,
    ),
    "POST /admin/keys": (
        {"org": "fuzz-org", "plan": "default", "name": "k", "user": "dev@fuzz.example", "expires_at": 4e9},
        None,
    ),
    "GET /v1/usage": (None, {"start_time": "0", "end_time": "4000000000", "limit": "5", "after": "1000"}),
    "GET /admin/usage": (None, {"org": "fuzz-org", "start_time": "0", "limit": "5", "after": "1000"}),
    "GET /admin/keys": (None, {"org": "fuzz-org"}),
}


def _paths(value: Any, path: tuple = ()) -> tuple[list[tuple], list[tuple]]:
    """Paths to the scalars and to the lists and maps inside a JSON document (not the document itself)."""
    scalars: list[tuple] = []
    containers: list[tuple] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, dict | list):
            containers.append((*path, key))
            inner = _paths(item, (*path, key))
            scalars += inner[0]
            containers += inner[1]
        else:
            scalars.append((*path, key))
    return scalars, containers


def _grown(value: list | dict) -> list | dict:
    """The same list or map, far over any limit."""
    if isinstance(value, list):
        return (value or ["x"]) * 1000
    return {**value, **{str(i): 1 for i in range(1000)}}


def _at(document: Any, path: tuple) -> Any:
    for key in path:
        document = document[key]
    return document


def _replace(document: Any, path: tuple, new: Any) -> None:
    _at(document, path[:-1])[path[-1]] = new


@dataclass
class Hostile:
    """A drawn case, and the body and query actually sent: schemathesis cannot check or serialize some of the
    values put in (a lone surrogate), so they stay out of the case."""

    case: Any
    body: Any
    query: dict[str, Any] | None


@st.composite
def hostile(draw: st.DrawFn, operation: Any, mode: GenerationMode) -> Hostile:
    case = draw(operation.as_strategy(generation_mode=mode))
    if "model" in (case.path_parameters or {}) and draw(st.booleans()):
        case.path_parameters["model"] = MODEL
    body, query = copy.deepcopy(case.body), copy.deepcopy(case.query)
    if operation.label in VALID and draw(st.booleans()):
        body, query = copy.deepcopy(VALID[operation.label])
    # A drawn model name is never the served one and would end every request at 404; most go to the model.
    elif isinstance(body, dict) and "model" in body and draw(st.sampled_from((True, True, True, False))):
        body["model"] = MODEL
    for _ in range(draw(st.integers(0, 3))):
        scalars, containers = _paths(body) if isinstance(body, dict | list) else ([], [])
        if containers and (not scalars or draw(st.integers(0, 3)) == 3):
            path = draw(st.sampled_from(containers))
            _replace(body, path, _grown(_at(body, path)))
        elif scalars:
            path = draw(st.sampled_from(scalars))
            alike = HOSTILE_BY_TYPE.get(type(_at(body, path)), HOSTILE_VALUES)
            _replace(body, path, draw(st.sampled_from(alike) | st.sampled_from(HOSTILE_VALUES)))
    if query is not None and draw(st.booleans()):
        # a documented filter with a value that does not parse, or a misspelt one ("start" for "start_time")
        query[draw(st.sampled_from([*sorted(query), "start"]))] = draw(st.sampled_from(HOSTILE_QUERY))
    return Hostile(case, body, query)


def _send(client: Any, request: Hostile, headers: dict[str, str]) -> Any:
    sent = request.case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    headers = sent["headers"]
    content = sent.get("data")
    if "json" in sent:
        # As a hostile client would: ASCII JSON whose escapes may spell lone surrogates, NaN and Infinity.
        content = json.dumps(request.body, ensure_ascii=True, allow_nan=True).encode()
        headers = {**headers, "content-type": "application/json"}
    params = request.query if request.query is not None else sent.get("params")
    return client.request(sent["method"], sent["url"], params=params, headers=headers, content=content)


def _check_error(error: Any) -> None:
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def check_response(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        _check_error(body["error"])
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                if "error" in event:  # an error told inside a started stream
                    _check_error(event["error"])
                    assert event["error"]["type"] != "server_error", event


def _breakable(raw: dict, operation: Any) -> bool:
    """Whether a request can break the schema at all (a free-text path segment cannot)."""
    spec = raw["paths"][operation.path][operation.method.lower()]
    free_text = {"type": "string"}
    return bool(spec.get("requestBody")) or any(
        {k: v for k, v in p["schema"].items() if k != "title"} != free_text
        for p in spec.get("parameters", ())
    )


def _fuzz(operation: Any, mode: GenerationMode, examples: int, send: Callable[[Hostile], None]) -> None:
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=hostile(operation, mode))
    def fuzz(request: Hostile) -> None:
        send(request)

    fuzz()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_request_gets_a_5xx_and_every_error_has_openais_shape(make_service, mode: GenerationMode):
    service = make_service({MODEL: StrictEngine(MODEL, max_model_len=64)})
    headers = auth(service.admin_key())
    keys = service.client.get("/admin/keys", headers=headers).json()["data"]
    admin_ids = {k["id"] for k in keys if k["admin"]}
    raw = service.client.app.openapi()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/chat/completions", "GET /v1/usage", "GET /admin/usage"} <= {o.label for o in operations}
    answered: list[int] = []

    def send(request: Hostile) -> None:
        key_id = (request.case.path_parameters or {}).get("key_id")
        # Revoking the key the fuzzer itself uses would turn the rest of the run into 401s.
        assume(not (request.case.operation.label.endswith("/revoke") and key_id in admin_ids))
        response = _send(service.client, request, headers)
        check_response(response)
        answered.append(response.status_code)

    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not _breakable(raw, operation):
            continue
        _fuzz(operation, mode, EXAMPLES[mode][0 if operation.label in GENERATION else 1], send)
    # The run reached the engine, not only the validation in front of it.
    assert mode == GenerationMode.NEGATIVE or answered.count(200) >= 10, sorted(answered)
