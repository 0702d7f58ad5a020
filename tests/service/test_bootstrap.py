"""The first start of the service writes an admin key, once, to a file only its owner can read."""

from __future__ import annotations

import os
import stat

import pytest

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
