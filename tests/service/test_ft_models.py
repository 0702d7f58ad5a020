"""Calling fine-tuned models through the official openai client against a live gateway that serves a tiny
llama on the real engine (#14): a job trained by the gateway's worker is callable as soon as it has succeeded,
with no restart (chat and its checkpoints), its usage is recorded under the `ft:` name, another organisation
gets 404 for it; a DPO job is trained, billed and served the same way; an adapter peft saved and `cumulo
adapters import` copied in while the gateway runs is served under its name, with the answer a local engine
gives with the same adapter."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import peft
import pytest
import torch
import transformers

from cumulo.cli.main import main
from cumulo.contracts import AdapterRef, SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig
from cumulo.finetune.api import validate_training_file
from tests.service.live import LiveServer
from tests.service.support import auth
from tests.service.test_finetune_live import new_key, training_file, wait_final
from tests.support.checkpoints import random_lora_b, save_bpe_tokenizer, write_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    directory = tmp_path_factory.mktemp("models") / "tiny"
    directory.mkdir()
    return write_hf_model(directory, "llama", tokenizer)


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"CUMULO_FINETUNE_MODELS": f"tiny={tiny}", "CUMULO_FINETUNE_WORKERS": "1"}
    live = LiveServer(tmp_path_factory.mktemp("live") / "data", env=env, model=str(tiny), fake=False)
    live.start(timeout=180)
    yield live
    live.stop()


def usage_of(server: LiveServer, key: str, model: str) -> list[dict]:
    rows = httpx.get(f"{server.url}/v1/usage", headers=auth(key), params={"limit": 100}).json()["data"]
    return [r for r in rows if r["model"] == model and r["endpoint"] != "fine_tuning"]


def test_a_finished_job_is_callable_by_its_organisation_only(server: LiveServer, tmp_path: Path) -> None:
    key = new_key(server, "acme")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with open(training_file(tmp_path, n=4), "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=file_id, suffix="adder", hyperparameters={"n_epochs": 1, "batch_size": 2}
    )
    done = wait_final(client, job.id)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model

    answer = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=6, temperature=0
    )
    assert answer.model == name and answer.usage.completion_tokens > 0
    assert isinstance(answer.choices[0].message.content, str)
    [row] = usage_of(server, key, name)
    assert row["status"] == "completed" and row["completion_tokens"] == answer.usage.completion_tokens

    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    text = client.completions.create(model=checkpoint, prompt="2 plus 2 is", max_tokens=3, temperature=0)
    assert text.model == checkpoint and text.usage.completion_tokens > 0
    assert client.models.retrieve(name).id == name

    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key=new_key(server, "globex"), max_retries=0)
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        stranger.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    with pytest.raises(openai.NotFoundError):
        stranger.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=name.replace(":adder:", ":other:"), messages=[{"role": "user", "content": "hi"}]
        )


def preference_file(directory: Path, n: int = 6) -> Path:
    path = directory / "prefs.jsonl"
    lines = [
        {
            "input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
            "non_preferred_output": [{"role": "assistant", "content": f"{i}{i}"}],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_dpo_job_trains_bills_and_serves_like_a_supervised_one(
    server: LiveServer, tiny: Path, tmp_path: Path
) -> None:
    key = new_key(server, "acme")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    prefs = preference_file(tmp_path)
    with open(prefs, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        suffix="prefer",
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 3, "beta": 0.2}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_final(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.n_epochs == 2
    # trained tokens: every pair's prompt once and both outputs, each epoch; billed once
    expected = 2 * validate_training_file(prefs, tiny, method="dpo").n_tokens
    assert done.trained_tokens == expected
    billed = httpx.get(f"{server.url}/v1/usage", headers=auth(key), params={"limit": 100}).json()["data"]
    assert sum(r["prompt_tokens"] for r in billed if r["endpoint"] == "fine_tuning") == expected

    metrics = [
        e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"
    ]
    assert len(metrics) == 4
    first = min(metrics, key=lambda m: m["step"])
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # a fresh adapter is the reference
    assert {"train_reward_margin", "train_reward_accuracy"} <= set(first)

    name = done.fine_tuned_model
    assert name == f"ft:tiny:acme:prefer:{job.id[6:14]}"
    answer = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=4, temperature=0
    )
    assert answer.model == name and answer.usage.completion_tokens > 0


def test_an_imported_peft_adapter_is_served_without_a_restart(
    server: LiveServer, tiny: Path, tmp_path: Path
) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    random_lora_b(model, 11, 0.5)
    model.save_pretrained(tmp_path / "peft")
    assert (
        main(
            [
                "--data-dir",
                str(server.data_dir),
                "adapters",
                "import",
                str(tmp_path / "peft"),
                "--name",
                "helper",
                "--base",
                "tiny",
            ]
        )
        == 0
    )

    key = new_key(server, "initech")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    prompt = "Hello world! The quick"
    served = client.completions.create(model="helper", prompt=prompt, max_tokens=8, temperature=0)
    base = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)

    local = create_engine(str(tiny), EngineConfig(device="cpu", dtype="float32", kv_cache_gib=0.01))
    ids = local.tokenizer.encode(prompt)
    params = SamplingParams(
        max_tokens=8,
        temperature=0.0,
        adapter=AdapterRef("helper", str(server.data_dir / "adapters" / "helper")),
    )
    local.add_request(ids, params, "r")
    tokens: list[int] = []
    while local.has_unfinished_requests():
        tokens += [t for o in local.step() for t in o.new_token_ids]
    assert served.choices[0].text == local.tokenizer.decode(tokens)
    assert served.choices[0].text != base.choices[0].text  # the adapter changes the answer
    listed = {m.id: m for m in client.models.list().data}
    assert listed["helper"].model_extra["parent"] == "tiny"  # imported adapters are listed with their base
    assert [r["completion_tokens"] for r in usage_of(server, key, "helper")] == [
        served.usage.completion_tokens
    ]
