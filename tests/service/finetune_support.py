"""Helpers of the fine-tuning tests: a fake validator and trainer with the real seam's types (so the state
machine, metering and API are tested in milliseconds), and shortcuts to upload files and run a worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from cumulo.cli.finetune_worker import Worker
from cumulo.finetune import api
from cumulo.service.db import Plan
from cumulo.service.finetune import terms as plan_terms
from tests.service.support import Service, auth

TOKENS_PER_STEP = 10
TUNABLE = "tiny"  # the name tests fine-tune (Settings.finetune_models maps it to a path nobody loads)


def chat_lines(n: int, bad_line: int | None = None) -> bytes:
    lines = []
    for i in range(1, n + 1):
        if i == bad_line:
            lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer"}], "BAD": True}))
        else:
            lines.append(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"q{i}"},
                            {"role": "assistant", "content": f"a{i}"},
                        ]
                    }
                )
            )
    return ("\n".join(lines) + "\n").encode()


def fake_validate(
    path: Path, model: str | Path, max_seq_len: int | None = None, method: str = "supervised"
) -> api.ValidationReport:
    """Reports a line that holds "BAD" as 'no assistant message', as the real validator would word it."""
    report = api.ValidationReport(n_examples=0, n_tokens=0, n_train_tokens=0)
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if "BAD" in line:
            report.errors.append((number, "no assistant message to train on"))
            continue
        report.n_examples += 1
        report.n_tokens += 20
        report.n_train_tokens += TOKENS_PER_STEP
    return report


class FakeTrainer:
    """Steps of TOKENS_PER_STEP tokens each, a checkpoint every `checkpoint_every` steps written as a directory
    `ckpt-N` in output_dir, resume from the newest one. `hook(step, should_stop)` runs before each step: tests
    cancel or kill from there."""

    def __init__(self, steps: int = 6, checkpoint_every: int = 2, hook: Callable[[int], None] | None = None):
        self.steps, self.checkpoint_every, self.hook = steps, checkpoint_every, hook
        self.starts: list[int] = []  # the step each run started from

    def __call__(self, spec: api.TrainSpec, on_event, should_stop) -> api.TrainResult:  # noqa: ANN001
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        done = [int(p.name.split("-")[1]) for p in spec.output_dir.glob("ckpt-*")] if spec.resume else []
        start = max(done, default=0)
        self.starts.append(start)
        step = start
        while step < self.steps:
            if should_stop():
                return self._result(spec, step, stopped=True)
            step += 1
            if self.hook is not None:
                self.hook(step)
            tokens = step * TOKENS_PER_STEP
            on_event(api.TrainEvent("step", step, self.steps, tokens, train_loss=1.0 / step))
            if step % self.checkpoint_every == 0:
                checkpoint = spec.output_dir / f"ckpt-{step}"
                checkpoint.mkdir(exist_ok=True)
                on_event(
                    api.TrainEvent(
                        "checkpoint",
                        step,
                        self.steps,
                        tokens,
                        train_loss=1.0 / step,
                        checkpoint_dir=checkpoint,
                    )
                )
        return self._result(spec, step, stopped=False)

    @staticmethod
    def _result(spec: api.TrainSpec, step: int, stopped: bool) -> api.TrainResult:
        adapter = spec.output_dir / "adapter"
        adapter.mkdir(exist_ok=True)
        return api.TrainResult(
            adapter, step * TOKENS_PER_STEP, step, 1.0 / max(step, 1), None, stopped=stopped
        )


def worker(service: Service, trainer: Callable | None = None) -> Worker:
    return Worker(
        service.state.sessions, service.state.settings, validate=fake_validate, train=trainer or FakeTrainer()
    )


def upload(service: Service, key: str, data: bytes, name: str = "train.jsonl") -> str:
    r = service.client.post(
        "/v1/files", headers=auth(key), files={"file": (name, data)}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create_job(service: Service, key: str, file_id: str, **body: object) -> dict:
    r = service.client.post(
        "/v1/fine_tuning/jobs", headers=auth(key), json={"model": TUNABLE, "training_file": file_id, **body}
    )
    assert r.status_code == 200, r.text
    return r.json()


def job(service: Service, key: str, job_id: str) -> dict:
    r = service.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def set_terms(service: Service, plan: str, **terms: object) -> None:
    """Fine-tuning terms (priority, max_jobs, monthly_training_tokens, price_training) of a plan."""
    with service.state.sessions() as session, session.begin():
        plan_terms.set_terms(session, session.scalar(select(Plan.id).where(Plan.name == plan)), **terms)


def training_usage(service: Service, key: str) -> list[dict]:
    r = service.client.get("/v1/usage", headers=auth(key), params={"limit": 100})
    assert r.status_code == 200, r.text
    return [row for row in r.json()["data"] if row["endpoint"] == "fine_tuning"]
