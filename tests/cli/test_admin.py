"""`cumulo admin`: plans, keys, organisations and usage from the command line, on the embedded SQLite database."""

from __future__ import annotations

from cumulo.cli.main import main
from cumulo.service import crud
from cumulo.service.auth import authenticate
from cumulo.service.settings import Settings
from cumulo.service.state import build_state


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
