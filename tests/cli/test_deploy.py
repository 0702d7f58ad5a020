"""`cumulo deploy`, `undeploy`, `deployments`: stored where a gateway finds them, bad options refused in one line."""

from __future__ import annotations

import json

import pytest

from cumulo.cli import deploy
from cumulo.cli.main import main
from cumulo.service import deployments
from cumulo.service.db import open_database, session_factory
from cumulo.service.migrate import upgrade
from cumulo.service.settings import Settings


def _stored(data_dir) -> dict[str, dict]:
    """What a gateway on this data directory reads."""
    database = open_database(Settings(data_dir=data_dir).database_url)
    try:
        upgrade(database)
        with session_factory(database)() as session:
            return {r.model: deployments.as_dict(r) for r in deployments.list_deployments(session)}
    finally:
        database.dispose()


def test_deploy_stores_what_a_gateway_reads_and_undeploy_removes_it(data_dir, capsys):
    d = ["--data-dir", str(data_dir)]
    assert (
        main([*d, "deploy", "smollm2-135m", "--replicas", "2", "--chip", "H100-SXM", "--ttft-slo-ms", "300"])
        == 0
    )
    assert capsys.readouterr().out.startswith("Deployed smollm2-135m (")
    row = _stored(data_dir)["smollm2-135m"]
    assert (row["source"], row["replicas"], row["chip"], row["ttft_slo_ms"]) == (
        "smollm2-135m",
        2,
        "h100-sxm",
        300,
    )

    assert main([*d, "deploy", "smollm2-135m", "--min-replicas", "1", "--max-replicas", "4"]) == 0
    assert capsys.readouterr().out.startswith("Updated smollm2-135m (")
    row = _stored(data_dir)["smollm2-135m"]
    assert (row["min_replicas"], row["max_replicas"], row["chip"]) == (1, 4, None)
    assert main([*d, "deploy", "smollm2-135m", "--min-replicas", "1", "--max-replicas", "4"]) == 0
    assert capsys.readouterr().out.startswith("Unchanged: smollm2-135m")

    assert main([*d, "undeploy", "smollm2-135m"]) == 0
    assert _stored(data_dir) == {}
    assert main([*d, "undeploy", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert err == "cumulo: error: no deployment named 'smollm2-135m'\n"


def test_a_model_path_is_stored_absolute_and_named_after_its_file(data_dir, tmp_path, monkeypatch):
    model = tmp_path / "weights" / "tiny.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", str(data_dir), "deploy", "weights/tiny.gguf"]) == 0
    assert main(["--data-dir", str(data_dir), "deploy", "weights/tiny.gguf", "--name", "tiny"]) == 0
    stored = _stored(data_dir)
    assert stored["tiny.gguf"]["source"] == str(model) and stored["tiny"]["source"] == str(model)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["smollm2-135m", "--replicas", "0"], "replicas must be between 1 and"),
        (["smollm2-135m", "--replicas", "2", "--min-replicas", "1"], "--replicas excludes --min-replicas"),
        (["smollm2-135m", "--max-replicas", "3"], "--min-replicas and --max-replicas go together"),
        (["smollm2-135m", "--min-replicas", "3", "--max-replicas", "2"], "1 <= min_replicas <= max_replicas"),
        (["smollm2-135m", "--tpot-slo-ms", "-1"], "tpot_slo_ms must be a positive"),
        (["smollm2-135m", "--chip", "tpu-v99"], "unknown chip 'tpu-v99'; known: "),
        (["smollm2-135m", "--format", "fp99"], "unknown weight format 'fp99'"),
        (["no-such-model"], "neither a catalog name"),
    ],
)
def test_bad_deploys_fail_in_one_line_and_store_nothing(data_dir, capsys, argv, message):
    assert main(["--data-dir", str(data_dir), "deploy", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cumulo: error: ") and message in err and err.count("\n") == 1
    assert _stored(data_dir) == {}


def test_deployments_lists_stored_ones_and_the_replicas_the_pool_reports(data_dir, capsys, monkeypatch):
    d = ["--data-dir", str(data_dir)]
    assert main([*d, "deployments"]) == 0
    assert "No deployments" in capsys.readouterr().out
    main([*d, "deploy", "smollm2-135m", "--min-replicas", "1", "--max-replicas", "3"])
    main([*d, "deploy", "gemma3-270m", "--format", "MXFP8"])
    capsys.readouterr()

    assert main([*d, "deployments"]) == 0
    table = capsys.readouterr().out
    assert "gemma3-270m" in table and "mxfp8" in table and "1..3 (start 1)" in table
    assert "No pool reachable" in table

    assert main([*d, "deployments", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["pool_reachable"] is False
    assert [(r["model"], r["replicas_status"]) for r in listing["data"]] == [
        ("gemma3-270m", []),
        ("smollm2-135m", []),
    ]

    replicas = [{"model": "smollm2-135m", "node": "node-a7", "state": "ready"}]
    monkeypatch.setattr(deploy, "live_replicas", lambda rows, address=None: replicas)
    assert main([*d, "deployments"]) == 0
    table = capsys.readouterr().out
    assert "node-a7" in table and "No pool reachable" not in table
    assert main([*d, "deployments", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["pool_reachable"] is True
    assert {r["model"]: r["replicas_status"] for r in listing["data"]} == {
        "gemma3-270m": [],
        "smollm2-135m": replicas,
    }


def test_an_unreachable_database_is_one_line_not_a_traceback(data_dir, capsys):
    url = "postgresql+psycopg://cumulo:secret@127.0.0.1:1/none"
    assert main(["--data-dir", str(data_dir), "deployments", "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cumulo: error: cannot use the service database") and err.count("\n") == 1
    assert "secret" not in err


def test_deploy_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["deploy", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--replicas", "--min-replicas", "--max-replicas", "--format", "--chip", "--ttft-slo-ms"):
        assert option in text
    assert "replaces its whole deployment" in text
