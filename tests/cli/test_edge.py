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


def test_edge_devices_shows_messages_refused_in_a_devices_name(data_dir, capsys):
    d = ["--data-dir", str(data_dir)]
    assert main(["admin", "key", "create", "--org", "acme", *d]) == 0
    assert main(["edge", "enroll", "--org", "acme", "--device-id", "shelf-9", *d]) == 0
    capsys.readouterr()
    app = create_app(Settings(data_dir=data_dir), {})
    with TestClient(app) as client:
        forged = {
            "device_id": "shelf-9",
            "seq": 1,
            "time": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
            "kind": "event",
            "auth": "cumulo-device-forged",
        }
        for _ in range(2):
            answer = client.post(
                "/v1/edge/results", json=forged, headers={"Authorization": "Bearer cumulo-device-forged"}
            )
            assert answer.status_code == 401
        app.state.edge.tick()
    assert main(["edge", "devices", "--org", "acme", *d]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "REFUSED" and row.startswith("shelf-9") and row.endswith("unauthorized 2")


def test_edge_simulate_enrols_the_devices_runs_them_and_a_second_run_continues(data_dir, tmp_path, capsys):
    """A small simulated fleet over HTTP against a live gateway on the same database: every device enrolled
    once, each sends its results from its own scene, and a second run carries on with the same devices."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from cumulo.edge.model import save_package, train_shelf_net

    d = ["--data-dir", str(data_dir)]
    assert main(["admin", "key", "create", "--org", "acme", *d]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    save_package(train_shelf_net(seed=0, per_class=20, epochs=1), fleet / "shelf-v1.safetensors")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(Settings(data_dir=data_dir), {})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    run = ["edge", "simulate", "--devices", "3", "--server", url, "--org", "acme", "--fleet-dir", str(fleet)]
    run += ["--fps", "0", "--frames", "12", "--change-every", "2", "--drain", "30", *d]
    try:
        headers = {"Authorization": f"Bearer {key}"}

        def stored() -> list[dict]:
            return httpx.get(f"{url}/v1/edge/results", params={"limit": 1000}, headers=headers).json()["data"]

        assert main(run) == 0
        assert "3 devices of acme (sim-00 .. sim-02)" in capsys.readouterr().out
        first = len(stored())
        assert main(run) == 0  # enrolled already: no new tokens, the same devices go on
        results = stored()
        devices = httpx.get(f"{url}/v1/edge/devices", headers={"Authorization": f"Bearer {key}"}).json()[
            "data"
        ]
    finally:
        server.should_exit = True
        thread.join(30)
    assert [(x["device_id"], x["state"]) for x in devices] == [(f"sim-0{i}", "enrolled") for i in range(3)]
    assert len(results) > first
    for name in ("sim-00", "sim-01", "sim-02"):
        seqs = sorted(r["seq"] for r in results if r["device_id"] == name)
        assert seqs and seqs == list(range(1, len(seqs) + 1))  # both runs' results, once each, seq continued
    bodies = {
        name: [r["body"] for r in results if r["device_id"] == name and r["kind"] == "event"]
        for name in ("sim-00", "sim-01")
    }
    assert bodies["sim-00"] != bodies["sim-01"]  # different seeds, different shelves
