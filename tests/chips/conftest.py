"""Shared fixtures: every chips test gets its own empty data directory, so no real calibration leaks in."""

from __future__ import annotations

import pytest

from cumulo import paths


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CUMULO_DATA_DIR", str(tmp_path / "data"))
    paths.set_data_dir(None)
    yield tmp_path / "data"
    paths.set_data_dir(None)
