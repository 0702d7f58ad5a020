"""Fine-tuning jobs trained on the nodes of a real local Ray pool (cluster/finetune_runner.py): the gateway side's
worker claims the job and writes everything to the database; a Ray actor on a node trains it from the file's
bytes and sends back steps, checkpoints and the adapter. The fine-tuned model answers through the gateway, the
adapter is byte for byte a local run's with the same seed, a job whose node dies (SIGKILL) resumes from its
checkpoint on the other node and is billed once, and a cancel stops the actor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from cumulo.cli.finetune_worker import Worker
from cumulo.cluster.controller import LiveNode
from cumulo.cluster.finetune_runner import PoolTrainer, choose_nodes
from cumulo.engine.async_engine import build_engine
from cumulo.finetune import api
from cumulo.service.app import create_app
from cumulo.service.settings import Settings
from tests.service.finetune_support import job, training_usage, upload
from tests.service.support import Service, auth
from tests.support.checkpoints import save_bpe_tokenizer, write_hf_model
from tests.support.finetune_pool import SlowTrainerActor
from tests.support.ray_pool import node_with, shared_pool

CHIP = "ft-pool-test"  # these nodes claim a chip of their own, so only this module's jobs go there
NODES = ("ft-a", "ft-b")
HYPER = {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0}
SEED = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    directory = tmp_path_factory.mktemp("models") / "tiny"
    directory.mkdir()
    return write_hf_model(directory, "llama", tokenizer)


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, str]]:
    yield {name: node_with(name, 1, CHIP) for name in NODES}
    for name in NODES:  # no other module uses them: give the machine back
        shared_pool().nodes[name].kill()


@pytest.fixture(scope="module")
def engine(tiny: Path) -> Iterator:
    engine = build_engine(str(tiny), device="cpu", format=None)
    yield engine
    engine.shutdown()


@pytest.fixture
def service(tiny: Path, engine, tmp_path: Path) -> Iterator[Service]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'cumulo.db'}",
        finetune_models={"tiny": str(tiny)},
    )
    app = create_app(settings, {"tiny": engine})
    with TestClient(app) as client:
        yield Service(client, app.state.service)
    app.state.service.db.dispose()


def lines(n: int = 8) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def submit(service: Service, key: str, suffix: str) -> str:
    file_id = upload(service, key, lines())
    r = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=auth(key),
        json={
            "model": "tiny",
            "training_file": file_id,
            "suffix": suffix,
            "seed": SEED,
            "hyperparameters": HYPER,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


def pool_worker(service: Service, trainer: PoolTrainer) -> Worker:
    return Worker(service.state.sessions, service.state.settings, train=trainer)


@pytest.fixture(scope="module")
def local_adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The adapter a local run (in this process, no pool) trains with the jobs' data, hyperparameters and seed."""
    directory = tmp_path_factory.mktemp("local")
    (directory / "train.jsonl").write_bytes(lines())
    spec = api.TrainSpec(
        model=str(tiny),
        training_file=directory / "train.jsonl",
        validation_file=None,
        hyper=api.Hyperparameters(3, 2, 1.0 * api.BASE_LEARNING_RATE),
        seed=SEED,
        output_dir=directory / "out",
    )
    threads = torch.get_num_threads()
    # one thread, as the pool's actor (it takes one CPU): sums in the same order give the same bits
    torch.set_num_threads(1)
    try:
        result = api.train(spec, lambda event: None, lambda: False)
    finally:
        torch.set_num_threads(threads)
    return {"tensors": load_file(str(result.adapter_dir / "adapter_model.safetensors")),
            "trained_tokens": result.trained_tokens}  # fmt: skip


def assert_same_adapter(adapter_dir: Path, local: dict) -> None:
    got = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert got.keys() == local["tensors"].keys()
    for name, tensor in local["tensors"].items():
        assert got[name].dtype == tensor.dtype and bool((got[name] == tensor).all()), name


def events_of(service: Service, key: str, job_id: str) -> list[str]:
    r = service.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth(key), params={"limit": 100})
    return [e["message"] for e in reversed(r.json()["data"])]


def test_a_job_trains_on_a_pool_node_and_its_model_answers(
    service: Service, nodes: dict[str, str], local_adapter: dict
) -> None:
    key = service.key(org="acme")
    job_id = submit(service, key, "adder")
    trainer = PoolTrainer(chip=CHIP)
    assert pool_worker(service, trainer).run(once=True) == 2  # validated here, trained on a node

    done = job(service, key, job_id)
    assert done["status"] == "succeeded", done["error"]
    assert [node for _, node in trainer.placed] in ([NODES[0]], [NODES[1]])
    adapter = service.state.settings.data_dir / "finetune" / job_id / "adapter"
    assert_same_adapter(adapter, local_adapter)  # the same seed trains the same adapter, here or on a node
    steps = sorted(p.name for p in (adapter.parent / "checkpoints").iterdir())
    assert steps == ["step-000004", "step-000008", "step-000012"]  # 4 steps per epoch, a checkpoint per epoch

    rows = training_usage(service, key)  # a row per checkpoint, as a local worker writes them
    assert len(rows) == 3 and all(r["model"] == "tiny" for r in rows)
    assert sum(r["prompt_tokens"] for r in rows) == done["trained_tokens"] == local_adapter["trained_tokens"]
    answer = service.client.post(
        "/v1/chat/completions",
        headers=auth(key),
        json={"model": done["fine_tuned_model"], "messages": [{"role": "user", "content": "What is 2 plus 2?"}],
              "max_tokens": 4, "temperature": 0},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == done["fine_tuned_model"]
    assert answer.json()["usage"]["completion_tokens"] > 0


def test_a_job_whose_node_dies_resumes_from_its_checkpoint_on_the_other_node_and_bills_once(
    service: Service, nodes: dict[str, str], local_adapter: dict
) -> None:
    key = service.key(org="acme")
    job_id = submit(service, key, "resumed")
    trainer = PoolTrainer(chip=CHIP, actor_class=SlowTrainerActor)
    killed: list[int] = []

    def kill_the_node_after_the_first_checkpoint(spec, on_event, should_stop):  # noqa: ANN001
        def watch(event: api.TrainEvent) -> None:
            on_event(event)
            if event.kind == "checkpoint" and not killed:
                killed.append(event.step)
                shared_pool().nodes[
                    trainer.placed[-1][1]
                ].kill()  # SIGKILL to the whole node, as a machine dying

        return trainer(spec, watch, should_stop)

    assert (
        pool_worker(service, kill_the_node_after_the_first_checkpoint).run(once=True) == 3
    )  # validate, lost, resumed
    done = job(service, key, job_id)
    assert done["status"] == "succeeded", done["error"]
    assert killed == [4]
    [(_, first), (_, second)] = trainer.placed
    assert first != second  # the node that lost the job is tried last
    messages = events_of(service, key, job_id)
    assert any("was lost" in m and "resumes from its last checkpoint" in m for m in messages)
    assert "Fine-tuning job resumed (attempt 2)" in messages
    assert_same_adapter(service.state.settings.data_dir / "finetune" / job_id / "adapter", local_adapter)
    # steps 5.. of the first attempt were trained twice; the ledger holds each token once
    assert done["trained_tokens"] == local_adapter["trained_tokens"]
    assert sum(r["prompt_tokens"] for r in training_usage(service, key)) == done["trained_tokens"]


def test_a_cancel_stops_the_actor_on_its_node(service: Service, nodes: dict[str, str]) -> None:
    key = service.key(org="acme")
    job_id = submit(service, key, "cancelled")
    trainer = PoolTrainer(chip=CHIP, actor_class=SlowTrainerActor)
    steps: list[int] = []
    actors: list = []
    stopped_at: list[int] = []

    def cancel_at_step_two(spec, on_event, should_stop):  # noqa: ANN001
        def watch(event: api.TrainEvent) -> None:
            on_event(event)
            if event.kind == "step":
                steps.append(event.step)
                actors[:] = [trainer.actors[job_id]]
                if event.step == 2:
                    r = service.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key))
                    assert r.status_code == 200, r.text

        result = trainer(spec, watch, should_stop)
        assert result.stopped  # the actor stopped early, not at the end of its run
        stopped_at.append(result.steps)
        return result

    assert pool_worker(service, cancel_at_step_two).run(once=True) == 2
    done = job(service, key, job_id)
    assert done["status"] == "cancelled"
    assert 2 <= max(steps) < 12
    # the checkpoint the stopped trainer saved on the node came back, for a later start to resume from
    [step] = stopped_at
    checkpoint = service.state.settings.data_dir / "finetune" / job_id / "checkpoints" / f"step-{step:06d}"
    assert (checkpoint / "trainer_state.pt").exists()
    billed = sum(r["prompt_tokens"] for r in training_usage(service, key))
    assert billed == done["trained_tokens"] > 0  # what it trained, once
    with pytest.raises(ray.exceptions.RayActorError):  # its actor is gone once the job settled
        ray.get(actors[0].poll.remote(0), timeout=30)


def test_placement_prefers_free_memory_and_tries_a_node_that_lost_the_job_last() -> None:
    def node(name: str) -> LiveNode:
        return LiveNode(
            node_id=name, name=name, chip=CHIP, devices=1, memory_gb=8, cores=2, cpus=2, labels={}
        )

    nodes = [node("a"), node("b"), node("c"), node("d")]
    free = {
        "a": {"CPU": 1, "memory": 4e9},
        "b": {"CPU": 1, "memory": 6e9},
        "c": {"CPU": 0, "memory": 9e9},  # no free CPU
        "d": {"CPU": 2, "memory": 1e9},  # too little memory
    }
    assert [n.name for n in choose_nodes(nodes, free, int(2e9), 1, avoid=set())] == ["b", "a"]
    assert [n.name for n in choose_nodes(nodes, free, int(2e9), 1, avoid={"b"})] == ["a", "b"]
    assert choose_nodes(nodes, free, int(7e9), 1, avoid=set()) == []


def test_a_base_model_no_node_has_fails_the_job_with_one_line(
    service: Service, nodes: dict[str, str]
) -> None:
    key = service.key(org="acme")
    job_id = submit(service, key, "nowhere")
    trainer = PoolTrainer(chip=CHIP)

    def elsewhere(spec, on_event, should_stop):  # noqa: ANN001
        return trainer(
            replace(spec, model="/nowhere/tiny"), on_event, should_stop
        )  # a path only the gateway has

    assert pool_worker(service, elsewhere).run(once=True) == 2
    done = job(service, key, job_id)
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found"
    message = done["error"]["message"]
    assert (
        message.startswith("no pool node has the base model (ft-")
        and "/nowhere/tiny is not on this node" in message
    )
    assert "\n" not in message and trainer.placed == []
