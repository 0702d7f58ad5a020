"""`cumulo serve` before its gateway starts: which models it serves, and the thread count it refuses or hands
to every engine."""

from __future__ import annotations

from cumulo.cli.main import main
from tests.service.fakes import FakeEngine


def test_serve_takes_models_from_flags_then_env_then_the_default(monkeypatch):
    import argparse

    from cumulo.cli.serve import DEFAULT_MODEL, model_refs

    monkeypatch.delenv("CUMULO_MODELS", raising=False)
    assert model_refs(argparse.Namespace(model=None)) == [DEFAULT_MODEL]
    monkeypatch.setenv("CUMULO_MODELS", "a, b")
    assert model_refs(argparse.Namespace(model=None)) == ["a", "b"]
    assert model_refs(argparse.Namespace(model=["c"])) == ["c"]


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
        engine_process, "EngineProcess", lambda ref, **options: seen.append(options) or FakeEngine(ref)
    )
    monkeypatch.setattr(
        async_engine, "build_engine", lambda ref, **options: seen.append(options) or FakeEngine(ref)
    )
    serve.load_engines(["/a", "/b"], "cpu", None, threads=1)
    serve.load_engines(["/c"], "cpu", None, threads=2, in_process=True)
    assert [o["threads"] for o in seen] == [1, 1, 2]


def test_two_models_under_one_name_are_refused_and_every_started_engine_stops(monkeypatch):
    import pytest

    from cumulo.cli import serve
    from cumulo.cluster import engine_process
    from cumulo.errors import InvalidRequest

    started: list[FakeEngine] = []

    def start(ref, **options):
        started.append(FakeEngine("same-name" if ref != "/first" else "first"))
        return started[-1]

    monkeypatch.setattr(engine_process, "EngineProcess", start)
    with pytest.raises(InvalidRequest, match="two models would be served as 'same-name'"):
        serve.load_engines(["/first", "/a", "/b"], "cpu", None)
    assert len(started) == 3 and all(engine.stopped for engine in started)
