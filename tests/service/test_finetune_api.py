"""The files and fine-tuning jobs endpoints as a client sees them: what is refused (with a 400 naming the
parameter, never a traceback), and that an organisation never sees or uses another's files and jobs."""

from __future__ import annotations

import pytest

from tests.service.finetune_support import TUNABLE, chat_lines, create_job, upload
from tests.service.support import auth


@pytest.fixture
def service(make_service):
    return make_service(finetune_models={TUNABLE: "unused"}, finetune_max_file_bytes=4096)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_an_uploaded_file_is_listed_retrieved_downloaded_and_deleted(service):
    key = service.key()
    data = chat_lines(3)
    file_id = upload(service, key, data, name="../../etc/train.jsonl")
    shown = service.client.get(f"/v1/files/{file_id}", headers=auth(key)).json()
    assert shown["bytes"] == len(data) and shown["purpose"] == "fine-tune" and shown["status"] == "processed"
    assert shown["filename"] == "train.jsonl"  # never a path
    assert service.client.get(f"/v1/files/{file_id}/content", headers=auth(key)).content == data
    listed = service.client.get("/v1/files", headers=auth(key)).json()
    assert [f["id"] for f in listed["data"]] == [file_id]
    deleted = service.client.delete(f"/v1/files/{file_id}", headers=auth(key)).json()
    assert deleted == {"id": file_id, "object": "file", "deleted": True}
    _error(service.client.get(f"/v1/files/{file_id}", headers=auth(key)), 404)
    assert service.client.get("/v1/files", headers=auth(key)).json()["data"] == []


@pytest.mark.parametrize(
    ("data", "purpose", "param", "words"),
    [
        (b'{"messages": []}\nnot json\n', "fine-tune", "file", "line 2: not valid JSON"),
        (b'{"messages": []}\n[1, 2]\n', "fine-tune", "file", "line 2: each line must be a JSON object"),
        (b"\n\n", "fine-tune", "file", "holds no examples"),
        (b'{"messages": []}\n', "assistants", "purpose", "not supported"),
    ],
)
def test_a_bad_upload_is_refused_with_the_line_or_parameter_at_fault(service, data, purpose, param, words):
    key = service.key()
    r = service.client.post(
        "/v1/files", headers=auth(key), files={"file": ("t.jsonl", data)}, data={"purpose": purpose}
    )
    error = _error(r, 400)
    assert error["param"] == param and words in error["message"]
    assert service.client.get("/v1/files", headers=auth(key)).json()["data"] == []


def test_an_upload_over_the_limit_is_refused_and_leaves_nothing_behind(service):
    key = service.key()
    big = chat_lines(200)
    assert len(big) > 4096
    r = service.client.post(
        "/v1/files", headers=auth(key), files={"file": ("t.jsonl", big)}, data={"purpose": "fine-tune"}
    )
    assert r.status_code in (400, 413) and "larger than" in r.json()["error"]["message"]
    assert service.client.get("/v1/files", headers=auth(key)).json()["data"] == []
    stored = service.state.settings.data_dir / "files"
    assert not stored.exists() or list(stored.iterdir()) == []  # not even a partial copy


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"suffix": "x" * 65}, 400, "suffix", ""),
        ({"suffix": "has:colon"}, 400, "suffix", ""),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}}},
            400,
            "method.dpo.hyperparameters.beta",
            "",
        ),
        (
            {"method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 2}},
            400,
            "hyperparameters",
            "method.dpo.hyperparameters",
        ),
        ({"method": {"type": "reinforcement"}}, 400, "method.type", "not supported yet"),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            400,
            "hyperparameters",
            "not both",
        ),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", ""),
        ({"hyperparameters": {"n_epochs": "many"}}, 400, "hyperparameters.n_epochs", ""),
        ({"hyperparameters": {"warmup": 3}}, 400, "hyperparameters.warmup", ""),
        ({"model": "gpt-4o"}, 404, None, "gpt-4o"),
        ({"training_file": "file-000000000000000000000000"}, 404, None, "no file"),
        ({"validation_file": "file-000000000000000000000000"}, 404, None, "validation_file"),
        ({"integrations": [{"type": "wandb"}]}, 400, "integrations", "not supported"),
    ],
)
def test_a_bad_job_request_is_refused_with_the_parameter_at_fault(service, body, status, param, words):
    key = service.key()
    file_id = upload(service, key, chat_lines(2))
    r = service.client.post(
        "/v1/fine_tuning/jobs", headers=auth(key), json={"model": TUNABLE, "training_file": file_id, **body}
    )
    error = _error(r, status)
    assert error["param"] == param and words in error["message"]
    assert service.client.get("/v1/fine_tuning/jobs", headers=auth(key)).json()["data"] == []


def test_both_ways_of_giving_hyperparameters_are_taken(service):
    key = service.key()
    file_id = upload(service, key, chat_lines(2))
    old = create_job(service, key, file_id, hyperparameters={"n_epochs": 2})
    new = create_job(
        service,
        key,
        file_id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 0.5}},
        },
    )
    assert old["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert new["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": "auto",
        "batch_size": 4,
        "learning_rate_multiplier": 0.5,
    }


def test_a_dpo_job_keeps_its_method_and_beta(service):
    key = service.key()
    file_id = upload(service, key, chat_lines(2))
    dpo = create_job(
        service,
        key,
        file_id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 3}}},
    )
    assert dpo["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {
                "n_epochs": 3,
                "batch_size": "auto",
                "learning_rate_multiplier": "auto",
                "beta": 0.25,
            }
        },
    }
    assert dpo["hyperparameters"] == {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    auto = create_job(service, key, file_id, method={"type": "dpo"})
    assert auto["method"]["dpo"]["hyperparameters"]["beta"] == "auto"
    listed = service.client.get(f"/v1/fine_tuning/jobs/{dpo['id']}", headers=auth(key)).json()
    assert listed["method"] == dpo["method"]


def test_jobs_are_listed_newest_first_in_pages(service):
    key = service.key()
    file_id = upload(service, key, chat_lines(2))
    ids = [create_job(service, key, file_id)["id"] for _ in range(3)]
    first = service.client.get("/v1/fine_tuning/jobs", headers=auth(key), params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[:0:-1] and first["has_more"] is True
    rest = service.client.get(
        "/v1/fine_tuning/jobs", headers=auth(key), params={"limit": 2, "after": ids[1]}
    ).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False


def test_another_organisation_can_neither_see_nor_use_files_and_jobs(service):
    owner, stranger = service.key(org="acme"), service.key(org="globex")
    file_id = upload(service, owner, chat_lines(2))
    job_id = create_job(service, owner, file_id)["id"]
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ]:
        _error(service.client.request(method, path, headers=auth(stranger)), 404)
    r = service.client.post(
        "/v1/fine_tuning/jobs", headers=auth(stranger), json={"model": TUNABLE, "training_file": file_id}
    )
    _error(r, 404)
    assert service.client.get("/v1/files", headers=auth(stranger)).json()["data"] == []
    assert service.client.get("/v1/fine_tuning/jobs", headers=auth(stranger)).json()["data"] == []
    # and the owner still has both
    assert (
        service.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(owner)).json()["status"]
        == "validating_files"
    )
