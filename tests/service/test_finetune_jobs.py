"""The fine-tuning job state machine, run by the real worker loop with a fake trainer (tests/service/
finetune_support.py), on SQLite and PostgreSQL: validation, training, checkpoints, metering exactly once,
cancel, a worker that dies, the queue order and the plan's caps."""

from __future__ import annotations

import pytest

from cumulo.service.finetune import queue
from tests.service.finetune_support import (
    TOKENS_PER_STEP,
    TUNABLE,
    FakeTrainer,
    chat_lines,
    create_job,
    fake_validate,
    job,
    set_terms,
    training_usage,
    upload,
    worker,
)
from tests.service.support import auth


@pytest.fixture
def service(make_service, tmp_path):
    return make_service(finetune_models={TUNABLE: str(tmp_path / "no-model-needed")})


class Died(BaseException):
    """Stands for kill -9 of the worker: nothing after it runs, the claim stays behind."""


def test_a_job_goes_from_validation_to_a_fine_tuned_model_and_bills_its_tokens_once(service):
    key = service.key(org="acme")
    created = create_job(service, key, upload(service, key, chat_lines(5)), suffix="support-bot")
    assert created["status"] == "validating_files" and created["trained_tokens"] is None
    assert created["hyperparameters"] == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }

    trainer = FakeTrainer(steps=6, checkpoint_every=2)
    assert worker(service, trainer).run(once=True) == 2  # validated, then trained

    done = job(service, key, created["id"])
    assert done["status"] == "succeeded", done
    assert done["trained_tokens"] == 6 * TOKENS_PER_STEP
    assert done["fine_tuned_model"] == f"ft:{TUNABLE}:acme:support-bot:{created['id'][6:14]}"
    assert isinstance(done["hyperparameters"]["n_epochs"], int)  # "auto" resolved after validation
    assert done["finished_at"] is not None and done["error"] is None

    events = service.client.get(
        f"/v1/fine_tuning/jobs/{created['id']}/events", headers=auth(key), params={"limit": 100}
    )
    messages = [e["message"] for e in reversed(events.json()["data"])]
    assert messages[0].startswith("Validating training file")
    assert any(m.startswith("Files validated: 5 examples") for m in messages)
    assert messages[-1] == "The job has successfully completed"
    metrics = [e["data"] for e in events.json()["data"] if e["type"] == "metrics"]
    assert sorted(m["step"] for m in metrics) == [1, 2, 3, 4, 5, 6]

    checkpoints = service.client.get(
        f"/v1/fine_tuning/jobs/{created['id']}/checkpoints", headers=auth(key)
    ).json()
    assert [c["step_number"] for c in checkpoints["data"]] == [6, 4, 2]
    assert checkpoints["data"][0]["fine_tuned_model_checkpoint"] == done["fine_tuned_model"] + ":ckpt-step-6"

    usage = training_usage(service, key)
    assert sum(row["prompt_tokens"] for row in usage) == 6 * TOKENS_PER_STEP
    assert {row["model"] for row in usage} == {TUNABLE}

    models = service.client.get("/v1/models", headers=auth(key)).json()["data"]
    assert {"id": done["fine_tuned_model"], "parent": TUNABLE}.items() <= next(
        m for m in models if m["id"] == done["fine_tuned_model"]
    ).items()
    other = service.client.get("/v1/models", headers=auth(service.key(org="globex"))).json()["data"]
    assert done["fine_tuned_model"] not in {m["id"] for m in other}


def test_a_dpo_job_is_validated_as_dpo_and_trained_with_its_resolved_beta(service):
    key = service.key()
    created = create_job(service, key, upload(service, key, chat_lines(3)), method={"type": "dpo"})
    specs, methods = [], []

    def validate(path, model, max_seq_len=None, method="supervised"):  # noqa: ANN001, ANN202
        methods.append(method)
        return fake_validate(path, model, max_seq_len, method)

    def train(spec, on_event, should_stop):  # noqa: ANN001, ANN202
        specs.append(spec)
        return FakeTrainer(steps=2)(spec, on_event, should_stop)

    runner = worker(service, train)
    runner.validate = validate
    assert runner.run(once=True) == 2
    done = job(service, key, created["id"])
    assert done["status"] == "succeeded", done
    assert methods == ["dpo"] and specs[0].method == "dpo" and specs[0].hyper.beta == 0.1
    assert done["method"]["type"] == "dpo" and done["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    assert "beta" not in done["hyperparameters"]


def test_a_bad_line_fails_the_job_with_the_line_and_the_problem(service):
    key = service.key()
    created = create_job(service, key, upload(service, key, chat_lines(4, bad_line=3)))
    trainer = FakeTrainer()
    worker(service, trainer).run(once=True)
    failed = job(service, key, created["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_training_file"
    assert failed["error"]["param"] == "training_file"
    assert "line 3: no assistant message to train on" in failed["error"]["message"]
    assert trainer.starts == [] and training_usage(service, key) == []


def test_cancel_while_running_stops_at_the_next_step_and_bills_what_was_trained(service):
    key = service.key()
    created = create_job(service, key, upload(service, key, chat_lines(3)))

    def cancel_before(step: int) -> None:
        if step == 4:  # three steps trained; the cancel lands while the fourth runs
            r = service.client.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel", headers=auth(key))
            assert r.status_code == 200 and r.json()["status"] == "cancelled"

    worker(service, FakeTrainer(steps=10, checkpoint_every=100, hook=cancel_before)).run(once=True)
    cancelled = job(service, key, created["id"])
    assert cancelled["status"] == "cancelled" and cancelled["fine_tuned_model"] is None
    assert cancelled["trained_tokens"] == 4 * TOKENS_PER_STEP  # the step under way when it was cancelled
    assert sum(row["prompt_tokens"] for row in training_usage(service, key)) == 4 * TOKENS_PER_STEP
    again = service.client.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel", headers=auth(key))
    assert again.status_code == 400 and "already cancelled" in again.json()["error"]["message"]


def test_cancel_of_a_queued_job_means_it_never_trains(service):
    key = service.key()
    created = create_job(service, key, upload(service, key, chat_lines(3)))
    service.client.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel", headers=auth(key))
    trainer = FakeTrainer()
    assert worker(service, trainer).run(once=True) == 0
    assert trainer.starts == [] and job(service, key, created["id"])["status"] == "cancelled"


def test_a_dead_workers_job_resumes_from_its_last_checkpoint_and_is_billed_once(make_service, tmp_path):
    service = make_service(finetune_models={TUNABLE: "x"}, finetune_stale_seconds=0.0)
    key = service.key()
    created = create_job(service, key, upload(service, key, chat_lines(3)))

    def die_at(step: int) -> None:
        if step == 6:  # checkpoints at 2 and 4 stored; step 5 reported, never checkpointed
            raise Died

    first = FakeTrainer(steps=8, checkpoint_every=2, hook=die_at)
    with pytest.raises(Died):
        worker(service, first).run(once=True)
    assert job(service, key, created["id"])["status"] == "running"  # nobody has noticed yet

    second = FakeTrainer(steps=8, checkpoint_every=2)
    worker(service, second).run(once=True)
    done = job(service, key, created["id"])
    assert done["status"] == "succeeded"
    assert second.starts == [4]  # resumed from the last checkpoint, not from scratch
    usage = training_usage(service, key)
    assert sum(row["prompt_tokens"] for row in usage) == 8 * TOKENS_PER_STEP  # steps 5 and 6 billed once
    assert len({row["request_id"] for row in usage}) == len(usage)
    events = service.client.get(
        f"/v1/fine_tuning/jobs/{created['id']}/events", headers=auth(key), params={"limit": 100}
    )
    assert any("stopped responding" in e["message"] for e in events.json()["data"])


def test_a_job_whose_workers_keep_dying_fails_with_a_clear_error(make_service):
    service = make_service(
        finetune_models={TUNABLE: "x"}, finetune_stale_seconds=0.0, finetune_max_attempts=2
    )
    key = service.key()
    created = create_job(service, key, upload(service, key, chat_lines(3)))

    def die(step: int) -> None:
        raise Died

    for _ in range(2):
        with pytest.raises(Died):
            worker(service, FakeTrainer(hook=die)).run(once=True)
    worker(service, FakeTrainer()).run(once=True)
    failed = job(service, key, created["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert "stopped responding 2 times" in failed["error"]["message"]


def test_a_worker_told_to_stop_puts_its_job_back_and_the_next_one_resumes_it(service):
    key = service.key()
    created = create_job(service, key, upload(service, key, chat_lines(3)))
    stopping = worker(service, FakeTrainer(steps=8, checkpoint_every=2))
    stopping.train.hook = lambda step: stopping.stopping.set() if step == 5 else None
    stopping.run(once=True)
    assert job(service, key, created["id"])["status"] == "queued"
    second = FakeTrainer(steps=8, checkpoint_every=2)
    worker(service, second).run(once=True)
    assert second.starts == [4] and job(service, key, created["id"])["status"] == "succeeded"
    assert sum(row["prompt_tokens"] for row in training_usage(service, key)) == 8 * TOKENS_PER_STEP


def test_the_queue_runs_higher_priority_plans_first_then_older_jobs(service):
    set_terms(service, "default", priority=0)
    low = service.key(org="small")
    high = service.key(org="big", plan="pro", rpm=None)  # creates the plan
    set_terms(service, "pro", priority=5)
    ids = []
    for key in (low, low, high):
        created = create_job(service, key, upload(service, key, chat_lines(2)))
        ids.append(created["id"])
    validator = worker(service)
    for _ in ids:  # validation takes jobs in the same order; run it without training
        claimed = queue.claim_next(service.state.sessions, queue.new_claim())
        validator._validate(claimed)
    order = [queue.claim_next(service.state.sessions, queue.new_claim()).job_id for _ in ids]
    assert order == [ids[2], ids[0], ids[1]]


def test_a_plan_caps_the_jobs_a_key_runs_at_once(service):
    key = service.key(plan="one-at-a-time", rpm=None)
    set_terms(service, "one-at-a-time", max_jobs=1)
    other = service.key(org="other")
    first = create_job(service, key, upload(service, key, chat_lines(2)))
    second = create_job(service, key, upload(service, key, chat_lines(2)))
    third = create_job(service, other, upload(service, other, chat_lines(2)))
    validator = worker(service)
    for _ in range(3):
        validator._validate(queue.claim_next(service.state.sessions, queue.new_claim()))
    running = queue.claim_next(service.state.sessions, queue.new_claim())
    assert running.job_id == first["id"]
    assert queue.claim_next(service.state.sessions, queue.new_claim()).job_id == third["id"]  # not capped
    assert queue.claim_next(service.state.sessions, queue.new_claim()) is None  # second waits for first
    queue.succeed(service.state.sessions, running, adapter_dir="a", trained_tokens=0, steps=0)
    assert queue.claim_next(service.state.sessions, queue.new_claim()).job_id == second["id"]


def test_the_monthly_training_token_cap_stops_a_job_and_refuses_new_ones(service):
    key = service.key(plan="capped", rpm=None)
    set_terms(service, "capped", monthly_training_tokens=5 * TOKENS_PER_STEP, price_training=2.0)
    created = create_job(service, key, upload(service, key, chat_lines(3)))
    worker(service, FakeTrainer(steps=10, checkpoint_every=100)).run(once=True)
    stopped = job(service, key, created["id"])
    assert stopped["status"] == "failed" and stopped["error"]["code"] == "quota_exceeded"
    usage = training_usage(service, key)
    billed = sum(row["prompt_tokens"] for row in usage)
    assert billed == 6 * TOKENS_PER_STEP  # the step that crossed the cap was trained, and is billed
    assert sum(row["cost"] for row in usage) == pytest.approx(billed * 2.0 / 1e6)
    r = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=auth(key),
        json={"model": TUNABLE, "training_file": upload(service, key, chat_lines(2))},
    )
    assert r.status_code == 429 and "training-token quota" in r.json()["error"]["message"]
