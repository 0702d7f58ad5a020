"""Fixtures of the CLI tests: a data directory of the test's own, on the embedded SQLite database."""

from __future__ import annotations

import pytest

from cumulo.paths import set_data_dir


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CUMULO_DATABASE_URL", raising=False)
    yield tmp_path
    set_data_dir(None)
