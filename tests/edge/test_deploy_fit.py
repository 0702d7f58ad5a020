"""`cumulo edge deploy --device-class`: the package the devices would download is checked against the target
(its formats, operators and memory) before any rollout; a model it cannot run is one line and exit status 1,
and nothing is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cumulo import paths
from cumulo.chips.edge import DoesNotFit, VisionWorkload, check_deploy
from cumulo.cli.main import main
from cumulo.edge.footprint import package_workload
from cumulo.edge.scenes import product_labels
from cumulo.service.app import create_app
from cumulo.service.settings import Settings


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CUMULO_DATABASE_URL", raising=False)
    yield tmp_path / "service"
    paths.set_data_dir(None)


def _fleet(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """One enrolled camera in organisation acme: its token traded for a credential at the service."""
    d = ["--data-dir", str(data_dir)]
    assert main(["admin", "key", "create", "--org", "acme", *d]) == 0
    assert main(["edge", "enroll", "--org", "acme", "--device-id", "cam-1", "--json", *d]) == 0
    token = json.loads(capsys.readouterr().out.splitlines()[-1])["enrollment_token"]
    with TestClient(create_app(Settings(data_dir=data_dir), {})) as client:
        assert client.post("/v1/edge/enroll", json={"token": token}).status_code == 200
    return d


def _rollouts(d: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    assert main(["edge", "rollouts", "--org", "acme", "--json", *d]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_model_the_sensor_can_run_is_rolled_out(
    data_dir: Path, shelf_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _fleet(data_dir, capsys)
    sha = hashlib.sha256(shelf_package.read_bytes()).hexdigest()
    deploy = ["edge", "deploy", "--org", "acme", "--name", "shelf", "--version", "2", "--sha256", sha]
    assert main([*deploy, "--url", shelf_package.as_uri(), "--device-class", "imx500", *d]) == 0
    assert [r["state"] for r in _rollouts(d, capsys)] == ["canary"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--format", "fp8"],
            "imx500 runs int8 only; cumulo-shelf-cnn-v1 (shelf.safetensors) would run in fp8",
        ),
        (["--format", "fp32"], "imx500 runs int8 only"),
        (["--url", "http://models/shelf"], "--device-class needs the model to check"),
        (["--sha256", "ab" * 32], "has sha256"),
        (["--device-class", "no-such-chip"], "no-such-chip"),
    ],
)
def test_a_model_the_target_cannot_run_is_refused_in_one_line_before_any_rollout(
    data_dir: Path,
    shelf_package: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    d = _fleet(data_dir, capsys)
    sha = hashlib.sha256(shelf_package.read_bytes()).hexdigest()
    argv = {"--sha256": sha, "--url": shelf_package.as_uri(), "--device-class": "imx500"}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        argv[flag] = value
    flat = [item for pair in argv.items() for item in pair]
    capsys.readouterr()
    assert main(["edge", "deploy", "--org", "acme", "--name", "shelf", "--version", "2", *flat, *d]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert _rollouts(d, capsys) == []


def test_the_check_names_memory_and_operators(shelf_package: Path) -> None:
    shelf, format = package_workload(shelf_package)
    classes = len(product_labels())
    # conv1 3->8 and conv2 8->16 (3x3, on 24x24 and 12x12), fc1 576->32, fc2 32->classes, per slot crop
    assert format == "mxint8" and shelf.ops == 4
    assert shelf.params == 224 + 1168 + 18_464 + 33 * classes
    assert shelf.macs == 8 * 24 * 24 * 27 + 16 * 12 * 12 * 72 + 32 * 576 + classes * 32
    assert check_deploy(shelf, "imx500", "mxint8") < 1e5  # a few tens of kB
    recurrent = VisionWorkload("lstm-counter", 100_000, 10_000_000, 10_000, 4, frozenset({"linear", "lstm"}))
    with pytest.raises(DoesNotFit, match="imx500 cannot run lstm-counter: no support for lstm"):
        check_deploy(recurrent, "imx500", "int8")
    assert check_deploy(recurrent, "rpi5", "fp32") > 0  # a CPU runs any operator
    big = VisionWorkload("resnet-50", 25_557_032, 4_100_000_000, 1_605_632, 54, frozenset({"conv2d"}))
    with pytest.raises(DoesNotFit, match=r"resnet-50 in int8 needs 27\.2 MB .* imx500 has 8\.0 MB"):
        check_deploy(big, "imx500", "int8")


def _api_fleet(data_dir: Path, client: TestClient, classes: dict[str, str | None]) -> dict[str, str]:
    """Devices of organisation acme created over the API with their classes, and enrolled; the admin key."""
    from cumulo.service import crud

    state = client.app.state.service
    with state.sessions() as session, session.begin():
        _, secret = crud.create_key(session, state.hasher, org_name="acme", plan_name="default")
    key = {"Authorization": f"Bearer {secret}"}
    for device_id, device_class in classes.items():
        body = {"device_id": device_id, "device_class": device_class}
        created = client.post("/v1/edge/devices", json=body, headers=key)
        assert created.status_code == 201 and created.json()["device_class"] == device_class, created.text
        token = created.json()["enrollment_token"]
        assert client.post("/v1/edge/enroll", json={"token": token}).status_code == 200
    return key


def test_the_rollouts_api_refuses_a_package_that_a_targeted_device_class_cannot_run(
    data_dir: Path, shelf_package: Path
) -> None:
    from cumulo.cli import edge_fit
    from cumulo.edge.model import save_package, train_shelf_net

    fp8 = save_package(train_shelf_net(seed=0), shelf_package.parent / "shelf-fp8.safetensors", "fp8")
    with TestClient(create_app(Settings(data_dir=data_dir), {})) as client:
        edge_fit.install(client.app)  # as `cumulo serve` does
        key = _api_fleet(data_dir, client, {"cam-s": "imx500", "cam-p": "rpi5", "cam-x": None})

        def rollout(package: Path) -> object:
            sha = hashlib.sha256(package.read_bytes()).hexdigest()
            body = {"name": "shelf", "version": "2", "sha256": sha, "url": package.as_uri()}
            return client.post("/v1/edge/rollouts", json=body, headers=key)

        refused = rollout(fp8)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert (
            error["message"]
            == "imx500 runs int8 only; cumulo-shelf-cnn-v1 (shelf-fp8.safetensors) would run in fp8"
        )
        assert client.get("/v1/edge/rollouts", headers=key).json()["data"] == []  # nothing written

        assert rollout(shelf_package).status_code == 201  # mxint8: the sensor runs it as int8, the CPU too
