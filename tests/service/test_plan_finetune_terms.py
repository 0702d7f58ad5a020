"""A plan's fine-tuning terms (priority, max_jobs, monthly_training_tokens, price_training) set and shown by
`cumulo admin plan create|finetune|list` and by the admin API, on SQLite and PostgreSQL alike; what they set is
what the fine-tuning queue and quota read (`jobs.plan_terms`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from cumulo.cli.main import main
from cumulo.service.db import ApiKey
from cumulo.service.finetune import jobs
from cumulo.service.settings import Settings
from cumulo.service.state import build_state
from tests.service.support import auth


def _admin(database_url: str, data_dir: Path, *argv: str) -> int:
    return main(["--data-dir", str(data_dir), "admin", *argv, "--database-url", database_url])


def test_admin_plan_sets_and_shows_fine_tuning_terms_from_the_command_line(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    create = ["plan", "create", "pro", "--finetune-priority", "5", "--monthly-training-tokens", "1000"]
    assert _admin(database_url, data, *create, "--price-training", "2.5") == 0
    assert _admin(database_url, data, "plan", "finetune", "pro") == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[-1].split() == ["pro", "5", "none", "1000", "2.5"]

    # Only the terms given change; 'none' lifts a cap.
    assert _admin(database_url, data, "plan", "finetune", "pro", "--finetune-max-jobs", "2") == 0
    assert _admin(database_url, data, "plan", "finetune", "pro", "--monthly-training-tokens", "none") == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["pro", "5", "2", "none", "2.5"]
    assert _admin(database_url, data, "plan", "list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].endswith("ft priority  ft max jobs  ft tokens/month  usd/M train")
    assert listing[1].split()[-4:] == ["0", "none", "none", "0.0"]  # the default plan has the defaults
    assert listing[2].split()[-4:] == ["5", "2", "none", "2.5"]

    # The key of the plan gets these terms where fine-tuning reads them.
    assert _admin(database_url, data, "key", "create", "--org", "acme", "--plan", "pro") == 0
    state = build_state(Settings(data_dir=data, database_url=database_url), {})
    try:
        with state.sessions() as session:
            key_id = session.scalar(select(ApiKey.id).order_by(ApiKey.id.desc()))
            terms = jobs.plan_terms(session, key_id)
            assert (terms.priority, terms.max_jobs, terms.monthly_training_tokens, terms.price_training) == (
                5,
                2,
                None,
                2.5,
            )
    finally:
        state.db.dispose()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "pro", "--finetune-max-jobs", "0"], "--finetune-max-jobs must be 1 or more, not 0"),
        (
            ["finetune", "pro", "--finetune-priority", "-1"],
            "--finetune-priority must be positive or 0, not -1",
        ),
        (["finetune", "pro", "--finetune-priority", "none"], "--finetune-priority 'none': expected a whole"),
        (
            ["finetune", "pro", "--monthly-training-tokens", "-5"],
            "--monthly-training-tokens must be positive",
        ),
        (["finetune", "pro", "--price-training", "-1"], "--price-training must be 0 to 1e+06 USD, not -1.0"),
        (["finetune", "pro", "--price-training", "nan"], "--price-training must be 0 to 1e+06 USD"),
        (["finetune", "pro", "--finetune-max-jobs", "two"], "--finetune-max-jobs 'two': expected a whole"),
        (["finetune", "gold", "--finetune-priority", "1"], "no plan named 'gold'"),
        (["create", "bad", "--monthly-training-tokens", "-1"], "--monthly-training-tokens must be positive"),
    ],
)
def test_admin_plan_refuses_bad_fine_tuning_terms_in_one_line(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    data = tmp_path / "data"
    assert _admin(database_url, data, "plan", "create", "pro", "--finetune-priority", "3") == 0
    capsys.readouterr()
    assert _admin(database_url, data, "plan", *argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert _admin(database_url, data, "plan", "list") == 0
    plans = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [p[0] for p in plans] == ["default", "pro"]  # a refused create leaves no plan behind
    assert plans[1][-4:] == ["3", "none", "none", "0.0"]  # a refused change changes nothing


def test_admin_api_creates_patches_and_shows_fine_tuning_terms(make_service) -> None:
    service = make_service()
    admin = auth(service.admin_key())
    body = {"name": "pro", "rpm": 10, "fine_tuning": {"priority": 4, "monthly_training_tokens": 10**6}}
    created = service.client.post("/admin/plans", headers=admin, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["fine_tuning"] == {
        "priority": 4,
        "max_jobs": None,
        "monthly_training_tokens": 10**6,
        "price_training": 0.0,
    }
    plain = service.client.post("/admin/plans", headers=admin, json={"name": "basic"}).json()
    assert plain["fine_tuning"] == {
        "priority": 0,
        "max_jobs": None,
        "monthly_training_tokens": None,
        "price_training": 0.0,
    }

    patch = {"max_jobs": 2, "monthly_training_tokens": None, "price_training": 1.5}
    patched = service.client.patch("/admin/plans/pro/fine_tuning", headers=admin, json=patch)
    assert patched.status_code == 200, patched.text
    expected = {
        "plan": "pro",
        "priority": 4,
        "max_jobs": 2,
        "monthly_training_tokens": None,
        "price_training": 1.5,
    }
    assert patched.json() == expected  # priority was left out, so it kept its value
    assert service.client.get("/admin/plans/pro/fine_tuning", headers=admin).json() == expected
    listed = {
        p["name"]: p["fine_tuning"] for p in service.client.get("/admin/plans", headers=admin).json()["data"]
    }
    assert listed["pro"] == {k: v for k, v in expected.items() if k != "plan"}

    for path, payload, status in [
        ("/admin/plans/pro/fine_tuning", {"max_jobs": 0}, 400),
        ("/admin/plans/pro/fine_tuning", {"priority": -1}, 400),
        ("/admin/plans/pro/fine_tuning", {"price_training": -0.5}, 400),
        ("/admin/plans/pro/fine_tuning", {"priority": None}, 400),
        ("/admin/plans/gold/fine_tuning", {"priority": 1}, 404),
    ]:
        refused = service.client.patch(path, headers=admin, json=payload)
        assert refused.status_code == status, refused.text
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert service.client.get("/admin/plans/pro/fine_tuning", headers=admin).json() == expected
    assert service.client.get("/admin/plans/gold/fine_tuning", headers=admin).status_code == 404
    bad = {"name": "neg", "fine_tuning": {"monthly_training_tokens": -1}}
    assert service.client.post("/admin/plans", headers=admin, json=bad).status_code == 400
    user = auth(service.key())
    assert (
        service.client.patch("/admin/plans/pro/fine_tuning", headers=user, json={"priority": 9}).status_code
        == 403
    )
    assert service.client.get("/admin/plans/pro/fine_tuning", headers=user).status_code == 403
