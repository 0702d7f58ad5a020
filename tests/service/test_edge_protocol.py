"""The edge protocol (cumulo.contracts.edge) both ends rely on: topics round-trip, and every malformed envelope is
one InvalidRequest line that says what is wrong."""

from __future__ import annotations

import json

import pytest

from cumulo.contracts.edge import (
    MAX_ENVELOPE_BYTES,
    UP_RESULTS,
    Envelope,
    parse_envelope,
    parse_topic,
    topic_for,
)
from cumulo.errors import InvalidRequest

GOOD = {
    "v": 1,
    "device_id": "cam-1",
    "seq": 5,
    "time": "2026-03-01T10:00:00+01:00",
    "kind": "count",
    "auth": "x",
}


def test_an_envelope_round_trips_and_topics_parse_back():
    envelope = parse_envelope(json.dumps(GOOD).encode())
    assert parse_envelope(envelope.to_bytes()) == envelope
    assert envelope.time.utcoffset().total_seconds() == 3600
    topic = topic_for("cam-1", UP_RESULTS, root="t/x")
    assert topic == "t/x/cam-1/up/results" and parse_topic(topic, root="t/x") == ("cam-1", UP_RESULTS)
    with pytest.raises(InvalidRequest):
        parse_topic("t/x/cam-1/up/other", root="t/x")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"v": 2}, "v"),
        ({"seq": -1}, "seq"),
        ({"device_id": "a/b"}, "device_id"),
        ({"device_id": "+"}, "device_id"),
        ({"time": "2026-03-01T10:00:00"}, "offset"),
        ({"kind": "Bad Kind"}, "kind"),
        ({"model": {"name": "m", "version": "1", "sha256": "short"}}, "sha256"),
        ({"unknown": 1}, "unknown"),
        ({"auth": ""}, "auth"),
    ],
)
def test_a_malformed_envelope_is_one_line_saying_what_is_wrong(change, says):
    with pytest.raises(InvalidRequest) as raised:
        parse_envelope(json.dumps({**GOOD, **change}).encode())
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_not_json_not_an_object_and_too_large_are_refused():
    for data, says in (
        (b"\xff{", "not JSON"),
        (b"[1]", "object"),
        (b" " * (MAX_ENVELOPE_BYTES + 1), "limit"),
    ):
        with pytest.raises(InvalidRequest, match=says):
            parse_envelope(data)
    assert isinstance(parse_envelope(GOOD), Envelope)
