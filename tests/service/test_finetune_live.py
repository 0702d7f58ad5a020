"""The whole fine-tuning flow through the official openai client against a live gateway, with the worker the
gateway starts and the real trainer on a tiny random llama: upload, create, poll events until it succeeds,
checkpoints, the fine-tuned model in /v1/models (its organisation only), training tokens in the usage ledger
once. And durability: a job created while no worker runs survives a gateway restart and is trained after it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.service.live import LiveServer
from tests.service.support import auth
from tests.support.checkpoints import save_bpe_tokenizer, write_hf_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return write_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer)


def training_file(directory: Path, n: int = 8) -> Path:
    path = directory / "train.jsonl"
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def new_key(server: LiveServer, org: str) -> str:
    r = httpx.post(
        f"{server.url}/admin/keys", headers=auth(server.admin_key()), json={"org": org, "plan": "default"}
    )
    assert r.status_code == 201, r.text
    return r.json()["key"]


def start(tmp_path: Path, model: Path, workers: int, data: str = "data") -> LiveServer:
    env = {"CUMULO_FINETUNE_MODELS": f"tiny={model}", "CUMULO_FINETUNE_WORKERS": str(workers)}
    return LiveServer(tmp_path / data, env=env).start()


def wait_final(client: openai.OpenAI, job_id: str, timeout: float = 240.0):  # noqa: ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


@pytest.fixture
def server(tmp_path: Path, tiny_model: Path) -> Iterator[LiveServer]:
    live = start(tmp_path, tiny_model, workers=1)
    yield live
    live.stop()


def test_the_official_client_fine_tunes_a_model_end_to_end(server: LiveServer, tmp_path: Path):
    key = new_key(server, "acme")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    with open(training_file(tmp_path), "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.status == "processed" and uploaded.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="adder",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
    )
    assert job.status == "validating_files"

    done = wait_final(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.fine_tuned_model == f"ft:tiny:acme:adder:{job.id[6:14]}"
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 2

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    assert any(e.type == "metrics" and e.data["train_loss"] > 0 for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].fine_tuned_model_checkpoint.startswith(
        done.fine_tuned_model + ":ckpt-step-"
    )
    assert (Path(server.data_dir) / "finetune" / job.id).is_dir()

    tuned = [m for m in client.models.list().data if m.id == done.fine_tuned_model]
    assert len(tuned) == 1 and tuned[0].model_extra["parent"] == "tiny"
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key=new_key(server, "globex"), max_retries=0)
    assert done.fine_tuned_model not in {m.id for m in stranger.models.list().data}
    with pytest.raises(openai.NotFoundError):
        stranger.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        stranger.files.retrieve(uploaded.id)

    usage = httpx.get(f"{server.url}/v1/usage", headers=auth(key), params={"limit": 100}).json()["data"]
    training = [row for row in usage if row["endpoint"] == "fine_tuning"]
    assert sum(row["prompt_tokens"] for row in training) == done.trained_tokens
    assert len({row["request_id"] for row in training}) == len(training)


def test_a_queued_job_survives_a_gateway_restart_and_is_trained_after_it(tmp_path: Path, tiny_model: Path):
    first = start(tmp_path, tiny_model, workers=0)
    try:
        key = new_key(first, "acme")
        client = openai.OpenAI(base_url=f"{first.url}/v1", api_key=key, max_retries=0)
        with open(training_file(tmp_path, n=4), "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=file_id, hyperparameters={"n_epochs": 1}
        )
    finally:
        first.kill()
    second = start(tmp_path, tiny_model, workers=1)
    try:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key=key, max_retries=0)
        assert wait_final(client, job.id).status == "succeeded"
    finally:
        second.stop()
