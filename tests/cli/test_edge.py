"""`cumulo edge`: a device enrolled from the command line trades its printed token for a credential at the
service, its results are listed, a deploy starts a rollout whose canaries get the model, and mistakes are
one-line errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from cumulo.cli.main import main
from cumulo.service.app import create_app
from cumulo.service.settings import Settings


def test_enroll_deploy_and_results_from_the_command_line(data_dir, capsys):
    d = ["--data-dir", str(data_dir)]
    assert main(["admin", "key", "create", "--org", "acme", *d]) == 0
    assert main(["edge", "enroll", "--org", "acme", "--device-id", "shelf-7", *d]) == 0
    printed = capsys.readouterr().out
    token = next(w for w in printed.split() if w.startswith("cumulo-enroll-"))
    assert f"cumulo edge agent --server http://127.0.0.1:8000 --token {token}" in printed

    with TestClient(create_app(Settings(data_dir=data_dir), {})) as client:
        credential = client.post("/v1/edge/enroll", json={"token": token}).json()["credential"]
        result = {
            "device_id": "shelf-7",
            "seq": 1,
            "time": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
            "kind": "event",
            "body": {"type": "slot_empty", "slot": 4},
            "auth": credential,
        }
        answer = client.post(
            "/v1/edge/results", json=result, headers={"Authorization": f"Bearer {credential}"}
        )
        assert answer.status_code == 200

    assert main(["edge", "results", "--org", "acme", "--kind", "event", *d]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["device_id"], r["body"]["slot"]) for r in lines] == [("shelf-7", 4)]

    deploy = ["edge", "deploy", "--org", "acme", "--name", "shelf", "--version", "2", "--url", "http://m/2"]
    assert main([*deploy, "--sha256", "c" * 64, "--json", *d]) == 0
    rollout = json.loads(capsys.readouterr().out)
    assert rollout["canaries"] == ["shelf-7"] and rollout["state"] == "canary"
    assert main(["edge", "devices", "--org", "acme", "--json", *d]) == 0
    (device,) = json.loads(capsys.readouterr().out)
    assert device["state"] == "enrolled" and device["desired"]["model"]["version"] == "2"
    assert main(["edge", "rollouts", "--org", "acme", *d]) == 0
    assert "canary" in capsys.readouterr().out


def test_edge_mistakes_are_one_line_errors(data_dir, capsys):
    d = ["--data-dir", str(data_dir)]
    assert main(["edge", "devices", "--org", "nobody", *d]) == 1
    assert main(["admin", "key", "create", "--org", "acme", *d]) == 0
    bad_sha = ["--name", "m", "--version", "1", "--sha256", "xyz", "--url", "u"]
    assert main(["edge", "deploy", "--org", "acme", *bad_sha, *d]) == 1
    assert main(["edge", "enroll", "--org", "acme", "--device-id", "a/b", *d]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "nobody" in errors[0] and "sha256" in errors[1] and "a/b" in errors[2]


def test_edge_agent_takes_its_options_through_cumulo_edge(data_dir, capsys):
    """`cumulo edge agent` is the agent's own parser: --help lists its options, a bad source is one line."""
    with pytest.raises(SystemExit) as stop:
        main(["edge", "agent", "--help"])
    assert stop.value.code == 0
    assert "--server" in capsys.readouterr().out
    code = main(["--data-dir", str(data_dir), "edge", "agent", "--source", "no-such-thing", "--frames", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "no-such-thing" in err
