"""The agent's `--device-class`: named in its heartbeats and reported state, and the same fit check as the
service's (`check_package_fits`) before it starts a model or installs a pushed one: a model that does not fit is
refused in one line (at start) or reported as an error status for the rollout (a push), and the old model keeps
running. With the real broker and service: tests/edge/test_fleet_end_to_end.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cumulo.chips.edge import DoesNotFit
from cumulo.cli.edge_agent import main
from cumulo.contracts.edge import DesiredModel, DesiredState, Envelope
from cumulo.edge.agent import Agent, AgentSettings, Identity
from cumulo.edge.model import save_package, train_shelf_net
from cumulo.edge.scenes import ShelfScene
from cumulo.edge.sources import SceneSource


def _agent(home: Path, model: Path, device_class: str | None, format: str = "mxint8") -> Agent:
    settings = AgentSettings(fps=0, summary_every=0, device_class=device_class, format=format)
    return Agent(home, Identity("cam-k", "cred-k"), SceneSource(ShelfScene(seed=2)), settings, model)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device-class", "imx500", "--format", "fp32"], "imx500 runs int8 only; cumulo-shelf-cnn-v1"),
        (["--device-class", "no-such-chip"], "unknown chip 'no-such-chip'"),
    ],
)
def test_the_agent_refuses_in_one_line_to_start_what_its_class_cannot_run(
    tmp_path: Path, shelf_package: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    home = tmp_path / "device"
    home.mkdir()
    Identity("cam-k", "cred-k").save(home)  # enrolled already: no server needed
    run = ["--data-dir", str(home), "--model", str(shelf_package), "--frames", "1", "--fps", "0", *argv]
    assert main(run) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (home / "outbox.db").exists()  # nothing started


def test_a_pushed_model_the_class_cannot_run_is_refused_and_reported_for_the_rollout(
    tmp_path: Path, shelf_package: Path
) -> None:
    fp8 = save_package(
        train_shelf_net(seed=4, per_class=20, epochs=1), tmp_path / "v2-fp8.safetensors", "fp8"
    )
    sha = hashlib.sha256(fp8.read_bytes()).hexdigest()
    good = hashlib.sha256(shelf_package.read_bytes()).hexdigest()
    agent = _agent(tmp_path / "device", shelf_package, "IMX500")  # any case; named by its chip id
    sent: list[tuple[str, Envelope]] = []
    agent.sender.publish = lambda leaf, message, qos=0: sent.append((leaf, message)) or True  # type: ignore[method-assign]
    try:
        agent.step()
        model = DesiredModel(name="shelf", version="2", sha256=sha, url=fp8.as_uri())
        agent.apply_desired(DesiredState(device_id="cam-k", revision=1, model=model, rollout_id=9))
        agent.step()
        assert agent.model_ref["sha256"] == good  # the old model keeps running
        statuses = [p for p in agent.outbox.pending(limit=1000) if p.kind == "status"]
        assert len(statuses) == 1 and statuses[0].body["ok"] is False and statuses[0].body["rollout_id"] == 9
        assert statuses[0].body["error"] == (
            f"imx500 runs int8 only; cumulo-shelf-cnn-v1 ({sha}.safetensors) would run in fp8"
        )
        assert statuses[0].model["sha256"] == sha
        leaves = [(leaf, m.body.get("state")) for leaf, m in sent]
        assert leaves[:2] == [("up/heartbeat", None), ("up/reported", "running")]  # the class, at start
        assert ("up/reported", "failed") in leaves
        assert all(m.body["device_class"] == "imx500" for _, m in sent)
    finally:
        agent.close()


def test_a_class_that_fits_installs_the_pushed_model_and_no_class_checks_nothing(
    tmp_path: Path, shelf_package: Path
) -> None:
    net = train_shelf_net(seed=4, per_class=20, epochs=1)
    v2, fp8 = (save_package(net, tmp_path / f"v2-{f}.safetensors", f) for f in ("mxint8", "fp8"))
    for device_class, package, home in (("rpi5", fp8, "pi"), ("imx500", v2, "sensor"), (None, fp8, "plain")):
        sha = hashlib.sha256(package.read_bytes()).hexdigest()
        agent = _agent(tmp_path / home, shelf_package, device_class)
        try:
            model = DesiredModel(name="shelf", version="2", sha256=sha, url=package.as_uri())
            agent.apply_desired(DesiredState(device_id="cam-k", revision=1, model=model, rollout_id=3))
            assert agent.model_ref["sha256"] == sha, device_class
        finally:
            agent.close()


def test_the_check_is_the_services_and_also_covers_the_format_the_agent_runs_in(shelf_package: Path) -> None:
    from cumulo.edge.footprint import check_package_fits

    assert check_package_fits(shelf_package, "imx500") < 1e5  # the package's own mxint8
    with pytest.raises(DoesNotFit, match="imx500 runs int8 only"):
        check_package_fits(shelf_package, "imx500", None, "fp32")
