"""Service settings: the environment fills them, flags win over it, and the database defaults to SQLite in the
data directory."""

from __future__ import annotations

from cumulo.service.settings import Settings


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
