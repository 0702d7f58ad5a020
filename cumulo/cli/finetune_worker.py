"""The fine-tuning worker: claims jobs from the service database and runs them with the trainer in this
process (`cumulo finetune worker`). It lives in the CLI layer because it needs both the service's database
code and `cumulo.finetune`, which the service may not import.

One job at a time: validate its file (-> queued, or failed with the line and the problem), then, when the
queue hands it back, train it, writing every step, checkpoint and the outcome to the database as they come. A
thread keeps the job's heartbeat while a long step runs. Between steps the trainer asks `should_stop`: true
when the job was cancelled, another worker took it over, the key's monthly training tokens ran out, or this
worker is asked to stop (SIGTERM, or its parent gateway died), in which case the job goes back to the queue
and the next worker resumes it from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from cumulo.errors import CumuloError
from cumulo.finetune import api
from cumulo.service.finetune import queue
from cumulo.service.settings import Settings

log = logging.getLogger("cumulo.finetune.worker")
Validate = Callable[..., api.ValidationReport]
Train = Callable[[api.TrainSpec, Callable[[api.TrainEvent], None], Callable[[], bool]], api.TrainResult]


@dataclass
class Worker:
    sessions: sessionmaker
    settings: Settings
    validate: Validate = api.validate_training_file
    train: Train = api.train
    parent_pid: int | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self, once: bool = False, poll_seconds: float = 1.0) -> int:
        """Works until stopped (or, with `once`, until the queue is empty). Returns the jobs it handled."""
        handled = 0
        while not self.should_exit():
            if self.work_once():
                handled += 1
                continue
            if once:
                break
            self.stopping.wait(poll_seconds)
        return handled

    def should_exit(self) -> bool:
        if self.parent_pid is not None and not _alive(self.parent_pid):
            self.stopping.set()
        return self.stopping.is_set()

    def work_once(self) -> bool:
        """Takes back the jobs of dead workers, then claims and handles one job. False when none was waiting."""
        settings = self.settings
        queue.requeue_lost(self.sessions, settings.finetune_stale_seconds, settings.finetune_max_attempts)
        job = queue.claim_next(self.sessions, queue.new_claim())
        if job is None:
            return False
        with _Heartbeat(self.sessions, job, settings.finetune_heartbeat_seconds):
            if job.status == "validating_files":
                self._validate(job)
            else:
                self._train(job)
        return True

    def _validate(self, job: queue.Claimed) -> None:
        missing = _missing_file(job)
        if missing:
            queue.fail(self.sessions, job, "invalid_training_file", missing, "training_file")
            return
        try:
            method = job.method
            report = self.validate(Path(job.training_path), job.source, method=method)  # type: ignore[arg-type]
            if not report.ok:
                message = f"training file {report.first_error()}"
                queue.fail(self.sessions, job, "invalid_training_file", message, "training_file")
                return
            if job.validation_path is not None:
                checked = self.validate(Path(job.validation_path), job.source, method=method)
                if not checked.ok:
                    message = f"validation file {checked.first_error()}"
                    queue.fail(self.sessions, job, "invalid_validation_file", message, "validation_file")
                    return
            hyper = api.resolve_hyperparameters(job.hyperparameters, report.n_examples, method)
        except CumuloError as exc:
            queue.fail(self.sessions, job, exc.code or "invalid_request", str(exc), None)
            return
        resolved = {
            "n_epochs": hyper.n_epochs,
            "batch_size": hyper.batch_size,
            "learning_rate_multiplier": hyper.learning_rate_multiplier,
        }
        if hyper.beta is not None:
            resolved["beta"] = hyper.beta
        queue.validated(self.sessions, job, report.n_examples, report.n_train_tokens, resolved)

    def _train(self, job: queue.Claimed) -> None:
        missing = _missing_file(job)
        if missing:
            queue.fail(self.sessions, job, "invalid_training_file", missing, "training_file")
            return
        output_dir = self.settings.data_dir / "finetune" / job.job_id
        hp = job.hyperparameters
        spec = api.TrainSpec(
            model=job.source,
            training_file=Path(job.training_path),  # type: ignore[arg-type]
            validation_file=Path(job.validation_path) if job.validation_path else None,
            hyper=api.Hyperparameters(
                n_epochs=int(hp["n_epochs"]),
                batch_size=int(hp["batch_size"]),
                learning_rate=float(hp["learning_rate_multiplier"]) * api.BASE_LEARNING_RATE,
                beta=float(hp["beta"]) if job.method == "dpo" else None,
            ),
            seed=job.seed,
            output_dir=output_dir,
            job_id=job.job_id,
            method="dpo" if job.method == "dpo" else "supervised",
        )
        run = _Run(self, job)
        try:
            result = self.train(spec, run.on_event, run.should_stop)
        except CumuloError as exc:
            if exc.code == "worker_lost" and run.stop_reason is not None:
                queue.release(self.sessions, job)  # told to stop while it waited for a pool node
            elif exc.code == "worker_lost":  # a pool node died under it (cluster/finetune_runner.py)
                queue.lost(self.sessions, job, self.settings.finetune_max_attempts, str(exc))
            else:
                queue.fail(
                    self.sessions, job, exc.code or "training_failed", str(exc), None, run.trained_tokens
                )
            return
        except Exception as exc:  # a bug of ours: the job fails with one line; the traceback goes to the log
            log.exception("job %s failed", job.job_id)
            message = f"training failed: {type(exc).__name__}: {exc}".splitlines()[0]
            queue.fail(self.sessions, job, "internal_error", message, None, run.trained_tokens)
            return
        if run.stop_reason == "quota":
            message = "the monthly training-token quota of this plan ran out; the job stopped"
            queue.fail(self.sessions, job, "quota_exceeded", message, None, result.trained_tokens)
        elif result.stopped or run.stop_reason is not None:
            queue.release(self.sessions, job, result.trained_tokens)
        else:
            queue.succeed(
                self.sessions,
                job,
                adapter_dir=str(result.adapter_dir),
                trained_tokens=result.trained_tokens,
                steps=result.steps,
            )


@dataclass
class _Run:
    """The trainer's callbacks for one job."""

    worker: Worker
    job: queue.Claimed
    trained_tokens: int = 0
    stop_reason: str | None = None

    def on_event(self, event: api.TrainEvent) -> None:
        self.trained_tokens = event.trained_tokens
        sessions = self.worker.sessions
        if event.kind == "step":
            reason = queue.progress(
                sessions,
                self.job,
                step=event.step,
                total_steps=event.total_steps,
                trained_tokens=event.trained_tokens,
                train_loss=event.train_loss,
                valid_loss=event.valid_loss,
                metrics=event.metrics,
            )
            self.stop_reason = self.stop_reason or reason
        elif event.kind == "checkpoint" and event.checkpoint_dir is not None:
            metrics: dict[str, Any] = {}
            if event.train_loss is not None:
                metrics["train_loss"] = event.train_loss
            if event.valid_loss is not None:
                metrics["valid_loss"] = event.valid_loss
            metrics.update(event.metrics)
            if not queue.checkpoint(
                sessions,
                self.job,
                step=event.step,
                path=str(event.checkpoint_dir),
                trained_tokens=event.trained_tokens,
                metrics=metrics,
            ):
                self.stop_reason = self.stop_reason or "lost"

    def should_stop(self) -> bool:
        if self.worker.should_exit():
            self.stop_reason = self.stop_reason or "shutdown"
        return self.stop_reason is not None


class _Heartbeat:
    """Beats for a claimed job every `period` seconds on a thread, so a long step never looks like death."""

    def __init__(self, sessions: sessionmaker, job: queue.Claimed, period: float) -> None:
        self.sessions, self.job, self.period = sessions, job, period
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job.job_id}", daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(self.period):
            try:
                queue.heartbeat(self.sessions, self.job)
            except Exception:
                log.exception("could not write the heartbeat of %s", self.job.job_id)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def _missing_file(job: queue.Claimed) -> str | None:
    if job.training_path is None or not Path(job.training_path).exists():
        return "the training file was deleted before the job could use it"
    if job.validation_file is not None and (
        job.validation_path is None or not Path(job.validation_path).exists()
    ):
        return "the validation file was deleted before the job could use it"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
