"""Fixtures of the CLI tests: a data directory of the test's own, passed as --data-dir (`data_dir`, on the embedded
SQLite database) or set in the environment (`isolated_data_dir`)."""

from __future__ import annotations

import pytest

from cumulo import paths


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CUMULO_DATABASE_URL", raising=False)
    yield tmp_path
    paths.set_data_dir(None)


@pytest.fixture
def isolated_data_dir(tmp_path, monkeypatch):
    """An empty data directory for verbs that read it, so that no real calibration leaks in."""
    monkeypatch.setenv("CUMULO_DATA_DIR", str(tmp_path / "data"))
    paths.set_data_dir(None)
    yield tmp_path / "data"
    paths.set_data_dir(None)
