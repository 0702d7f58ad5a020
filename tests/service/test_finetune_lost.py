"""A job whose trainer is lost while its worker lives (a pool node died under it, cluster/finetune_runner.py):
the worker's loop puts it back in the queue to resume from its last checkpoint, and fails it with `worker_lost`
once it was started `finetune_max_attempts` times; the ledger bills its tokens once (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from cumulo.errors import EngineUnavailable
from tests.service.finetune_support import (
    TOKENS_PER_STEP,
    TUNABLE,
    FakeTrainer,
    chat_lines,
    create_job,
    job,
    training_usage,
    upload,
    worker,
)
from tests.service.support import auth


class NodeLost(EngineUnavailable):
    code = "worker_lost"


@pytest.fixture
def service(make_service, tmp_path):
    return make_service(finetune_models={TUNABLE: str(tmp_path / "no-model-needed")}, finetune_max_attempts=2)


def losing(trainer: FakeTrainer, lose_at: set[int]) -> FakeTrainer:
    """`trainer`, whose node is lost before the steps in `lose_at` (once each)."""

    def hook(step: int) -> None:
        if step in lose_at:
            lose_at.discard(step)
            raise NodeLost(f"the pool node training this job was lost at step {step}")

    trainer.hook = hook
    return trainer


def test_a_lost_node_requeues_the_job_which_resumes_from_its_checkpoint_and_bills_once(service):
    key = service.key(org="acme")
    created = create_job(service, key, upload(service, key, chat_lines(4)))
    trainer = losing(FakeTrainer(steps=6, checkpoint_every=2), {4})
    assert worker(service, trainer).run(once=True) == 3  # validated, lost, resumed
    assert trainer.starts == [0, 2]  # the second start resumed from the checkpoint of step 2
    done = job(service, key, created["id"])
    assert done["status"] == "succeeded", done
    events = service.client.get(
        f"/v1/fine_tuning/jobs/{created['id']}/events", headers=auth(key), params={"limit": 100}
    ).json()["data"]
    lost = [e for e in events if "lost at step 4" in e["message"]]
    assert len(lost) == 1 and lost[0]["level"] == "warn"
    assert "queued again and resumes from its last checkpoint" in lost[0]["message"]
    assert sum(r["prompt_tokens"] for r in training_usage(service, key)) == 6 * TOKENS_PER_STEP


def test_a_job_lost_max_attempts_times_fails_with_worker_lost(service):
    key = service.key(org="acme")
    created = create_job(service, key, upload(service, key, chat_lines(4)))
    trainer = losing(FakeTrainer(steps=6, checkpoint_every=2), {3, 5})
    assert worker(service, trainer).run(once=True) == 3  # validated, lost, lost again: failed
    done = job(service, key, created["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "worker_lost"
    assert "lost at step 5" in done["error"]["message"] and "started 2 times" in done["error"]["message"]
    # what it trained (steps 1-4 of both attempts: 4 steps) is billed once
    assert sum(r["prompt_tokens"] for r in training_usage(service, key)) == 4 * TOKENS_PER_STEP
