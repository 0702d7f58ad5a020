"""`cumulo admin` and the first-start admin key of `cumulo serve`, on the embedded SQLite database."""

from __future__ import annotations

import os
import stat

import pytest

from cumulo.cli.main import main
from cumulo.errors import Conflict
from cumulo.paths import set_data_dir
from cumulo.service import crud
from cumulo.service.auth import authenticate
from cumulo.service.bootstrap import ensure_admin_key
from cumulo.service.settings import Settings
from cumulo.service.state import build_state
from tests.service.fakes import FakeEngine


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CUMULO_DATABASE_URL", raising=False)
    yield tmp_path
    set_data_dir(None)


def test_admin_key_create_prints_a_working_key_as_its_last_line(data_dir, capsys):
    assert (
        main(["admin", "plan", "create", "pro", "--rpm", "5", "--models", "a,b", "--data-dir", str(data_dir)])
        == 0
    )
    assert (
        main(["admin", "key", "create", "--org", "acme", "--plan", "pro", "--data-dir", str(data_dir)]) == 0
    )
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("sk-cumulo-")
    state = build_state(Settings(data_dir=data_dir), {})
    with state.sessions() as session:
        principal = authenticate(session, state.hasher, secret)
    assert (
        principal.org_name == "acme" and principal.plan.name == "pro" and principal.plan.models == ("a", "b")
    )
    assert main(["admin", "key", "list", "--data-dir", str(data_dir)]) == 0
    listing = capsys.readouterr().out
    assert "acme" in listing and secret not in listing
    state.db.dispose()


def test_admin_plan_create_takes_per_model_prices(data_dir, capsys):
    assert (
        main(["--data-dir", str(data_dir), "admin", "plan", "create", "priced", "--model-price", "m=1.5,2"])
        == 0
    )
    assert main(["--data-dir", str(data_dir), "admin", "plan", "create", "bad", "--model-price", "m=x"]) == 1
    state = build_state(Settings(data_dir=data_dir), {})
    with state.sessions() as session:
        assert crud.get_plan(session, "priced").model_prices == {"m": [1.5, 2.0]}
    state.db.dispose()


def test_admin_plan_create_refuses_a_duplicate(data_dir, capsys):
    assert main(["--data-dir", str(data_dir), "admin", "plan", "create", "pro"]) == 0
    assert main(["--data-dir", str(data_dir), "admin", "plan", "create", "pro"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_admin_revoke_and_listings_work_from_the_command_line(data_dir, capsys):
    main(["--data-dir", str(data_dir), "admin", "key", "create", "--org", "acme"])
    assert main(["--data-dir", str(data_dir), "admin", "key", "revoke", "1"]) == 0
    assert main(["--data-dir", str(data_dir), "admin", "org", "list"]) == 0
    assert main(["--data-dir", str(data_dir), "admin", "usage", "--since", "2020-01-01"]) == 0
    out = capsys.readouterr().out
    assert "Revoked key 1" in out and "acme" in out and "requests 0" in out


def test_first_start_writes_the_admin_key_to_a_private_file_once(data_dir):
    state = build_state(Settings(data_dir=data_dir), {"fake-model": FakeEngine()})
    path = ensure_admin_key(state)
    assert path is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = path.read_text().strip()
    with state.sessions() as session:
        assert authenticate(session, state.hasher, secret).is_admin
        with pytest.raises(Conflict):
            crud.create_plan(session, "default")
    assert ensure_admin_key(state) is None
    assert stat.S_IMODE(os.stat(data_dir / "cumulo.db").st_mode) == 0o600
    state.db.dispose()


def test_serve_takes_models_from_flags_then_env_then_the_default(monkeypatch):
    import argparse

    from cumulo.cli.serve import DEFAULT_MODEL, model_refs

    monkeypatch.delenv("CUMULO_MODELS", raising=False)
    assert model_refs(argparse.Namespace(model=None)) == [DEFAULT_MODEL]
    monkeypatch.setenv("CUMULO_MODELS", "a, b")
    assert model_refs(argparse.Namespace(model=None)) == ["a", "b"]
    assert model_refs(argparse.Namespace(model=["c"])) == ["c"]


def test_settings_read_the_environment_and_flags_win(monkeypatch, tmp_path):
    monkeypatch.setenv("CUMULO_HOST", "0.0.0.0")
    monkeypatch.setenv("CUMULO_PORT", "9001")
    monkeypatch.setenv("CUMULO_DATABASE_URL", "postgresql+psycopg://x@y/z")
    settings = Settings.from_env(port=9002, data_dir=tmp_path)
    assert (settings.host, settings.port, settings.database_url) == (
        "0.0.0.0",
        9002,
        "postgresql+psycopg://x@y/z",
    )
    monkeypatch.delenv("CUMULO_DATABASE_URL")
    assert Settings.from_env(data_dir=tmp_path).database_url == f"sqlite:///{tmp_path / 'cumulo.db'}"


def test_serve_refuses_a_thread_count_below_one_in_one_line(data_dir, capsys):
    assert main(["--data-dir", str(data_dir), "serve", "--model", str(data_dir), "--threads", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cumulo: error: threads must be at least 1, not 0"]


def test_serve_hands_its_thread_count_to_every_engine(monkeypatch):
    from cumulo.cli import serve
    from cumulo.cluster import engine_process
    from cumulo.engine import async_engine

    seen = []
    monkeypatch.setattr(
        engine_process, "EngineProcess", lambda ref, **options: seen.append(options) or FakeEngine()
    )
    monkeypatch.setattr(
        async_engine, "build_engine", lambda ref, **options: seen.append(options) or FakeEngine()
    )
    serve.load_engines(["/a", "/b"], "cpu", None, threads=1)
    serve.load_engines(["/c"], "cpu", None, threads=2, in_process=True)
    assert [o["threads"] for o in seen] == [1, 1, 2]
