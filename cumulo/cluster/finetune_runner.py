"""Fine-tuning on a pool node: a Ray actor that trains with `cumulo.finetune.api.train` where Ray placed it,
driven by the worker on the gateway's side (`PoolTrainer`, the worker's `train`).

The node needs neither the database nor the gateway's data directory. The job's spec and its files' bytes
travel to the actor (with the newest checkpoint the gateway holds, so a resumed job continues from it); each
step, checkpoint (its files' bytes) and the adapter come back, and the worker writes them where and as a local
run does (`<data dir>/finetune/<job id>/checkpoints/step-N/`, `.../adapter/`), so the claim, heartbeat,
events, billing and the served `ft:` model are the local worker's. A cancel (or a stopping worker) reaches the
actor at the next poll; the actor saves the adapter as it is and returns, as the local trainer does.

Where: `choose_nodes` orders the pool's alive nodes that have a free CPU and the memory the job needs
(`training_memory_bytes`: fp32 weights plus a packed sequence's activations), nodes that lost this job before
last, then the most free memory first; the actor is pinned to the first whose node has the base model (a
catalog model is pulled there; a file or directory must exist at the same path), else the next.

The actor is not detached: its owner is the worker process, so a worker (or gateway) that dies takes its
training with it and the job is requeued through the heartbeat. A lost actor (its node died, or it was killed)
raises `TrainerLost`; the worker requeues the job to resume from its last checkpoint elsewhere, or fails it
after `finetune_max_attempts` starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cumulo.cluster.controller import LiveNode, live_nodes
from cumulo.cluster.ray_cluster import NAMESPACE
from cumulo.errors import CumuloError, EngineUnavailable
from cumulo.finetune import api

log = logging.getLogger(__name__)
Files = dict[str, bytes]  # path relative to a directory -> the file's bytes
POLL_S = 0.5  # how long one poll waits for the actor's next events; a cancel reaches it within about this
CALL_TIMEOUT_S = 60.0  # a poll that does not answer this much after its wait: the node is taken for lost
WAIT_S = 2.0  # how often a job that no node has room for looks again
PLACE_TIMEOUT_S = 120.0  # the actor's process started on its node (else another worker took the room first)
START_TIMEOUT_S = 600.0  # pulling the base model there, or writing the files and starting the trainer


class TrainerLost(EngineUnavailable):
    """The pool node (or actor) training a job is gone; the job resumes from its last checkpoint."""

    code = "worker_lost"


class TrainingFailed(CumuloError):
    """Training on the node raised; carries the trainer's code and one-line message."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- files as bytes ----------------------------------------------------------------------------------------------
def read_tree(directory: Path) -> Files:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def write_tree(directory: Path, files: Files) -> Path:
    """Writes under a temporary name and renames, as the trainer does: a directory that exists is complete."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for relative, data in files.items():
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


# -- the actor ---------------------------------------------------------------------------------------------------
class TrainerActor:
    """Runs inside the Ray actor: one job, trained on a thread in a scratch directory; `poll` hands back what
    happened since the last call (events with checkpoint bytes, then the outcome)."""

    def __init__(self) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.scratch = Path(tempfile.mkdtemp(prefix="cumulo-ft-"))
        self.out: queue.Queue[tuple] = queue.Queue()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def ready(self) -> str:
        """Answers once the actor runs on its node: its node id."""
        return self.node_id

    def has_model(self, model: str) -> str | None:
        """None when the base model can be loaded here (a catalog model is pulled now), else why not."""
        from cumulo.models import catalog, pull

        if model in catalog.CATALOG:
            if not pull.is_pulled(model):
                try:
                    pull.ensure(model, progress=False)
                except CumuloError as exc:
                    return f"cannot pull {model}: {exc}"
            return None
        return None if Path(model).exists() else f"{model} is not on this node"

    def start(
        self,
        spec: api.TrainSpec,
        training: bytes,
        validation: bytes | None,
        resume: tuple[str, Files] | None,
    ) -> str:
        """Writes the files and the checkpoint to resume from into the scratch directory and starts training."""
        output = self.scratch / "output"
        training_file = self.scratch / "training.jsonl"
        training_file.write_bytes(training)
        validation_file = None
        if validation is not None:
            validation_file = self.scratch / "validation.jsonl"
            validation_file.write_bytes(validation)
        if resume is not None:  # (checkpoint directory name, its files)
            write_tree(output / "checkpoints" / resume[0], resume[1])
        local = replace(spec, training_file=training_file, validation_file=validation_file, output_dir=output)
        self.thread = threading.Thread(target=self._train, args=(local,), name="finetune", daemon=True)
        self.thread.start()
        return self.node_id

    def _train(self, spec: api.TrainSpec) -> None:
        def on_event(event: api.TrainEvent) -> None:
            files = read_tree(event.checkpoint_dir) if event.checkpoint_dir is not None else None
            self.out.put(("event", event, files))

        try:
            result = api.train(spec, on_event, self.should_stop)
        except CumuloError as exc:
            self.out.put(("error", exc.code or "training_failed", str(exc)))
            return
        except Exception as exc:  # a bug of ours: one line back, the traceback into the node's log
            log.exception("training failed")
            self.out.put(("error", "internal_error", f"training failed: {type(exc).__name__}: {exc}"))
            return
        # a stopped run saves a last checkpoint without an event: it travels with the outcome
        newest = api.newest_checkpoint(spec.output_dir) if result.stopped else None
        checkpoint = (newest.name, read_tree(newest)) if newest is not None else None
        self.out.put(("done", result, read_tree(result.adapter_dir), checkpoint))

    def poll(self, wait_s: float) -> list[tuple]:
        """What happened since the last poll, waiting up to `wait_s` for the first of it."""
        items = []
        with contextlib.suppress(queue.Empty):
            items.append(self.out.get(timeout=wait_s))
            while True:
                items.append(self.out.get_nowait())
        return items

    def should_stop(self) -> bool:
        """The trainer asks between steps."""
        return self.stopping.is_set()

    def stop(self) -> None:
        """Ends training at the next step (the adapter is saved as it is; `poll` then returns the outcome)."""
        self.stopping.set()

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


# -- placement ---------------------------------------------------------------------------------------------------
def training_memory_bytes(model: str | Path, max_seq_len: int = 1024) -> int:
    """What training `model` holds, roughly: its weights in fp32 (the trainer loads fp32), the activations
    autograd keeps for one packed sequence (per layer about 16 hidden-wide and 4 intermediate-wide fp32 values
    per token), the logits of its tokens and their gradient, and 512 MiB for the process. 0 when the model
    cannot be read here (then Ray is asked for no memory)."""
    from cumulo.chips.presets import shape_from_config
    from cumulo.models.loader import load_config

    try:
        config = load_config(model)
    except CumuloError:
        return 0
    weights = shape_from_config(config).total_params * 4
    tokens = min(max_seq_len, config.max_position_embeddings)
    layers = config.num_hidden_layers * tokens * (16 * config.hidden_size + 4 * config.intermediate_size) * 4
    logits = 2 * tokens * config.vocab_size * 4
    return int(weights + layers + logits + 512 * 1024**2)


def choose_nodes(
    nodes: list[LiveNode], free: dict[str, dict[str, float]], need_bytes: int, cpus: float, avoid: set[str]
) -> list[LiveNode]:
    """The nodes to try for a job, best first: those with `cpus` free and `need_bytes` of free memory
    (`free`: Ray's available resources per node id), nodes that lost this job before last, then the most free
    memory first (a tie: the name)."""
    fits = [
        n
        for n in nodes
        if free.get(n.node_id, {}).get("CPU", 0.0) >= cpus
        and free.get(n.node_id, {}).get("memory", 0.0) >= need_bytes
    ]
    return sorted(fits, key=lambda n: (n.node_id in avoid, -free[n.node_id].get("memory", 0.0), n.name))


def _free_resources() -> dict[str, dict[str, float]]:
    import ray

    try:  # Ray has no public per-node view of what is free; its state API is the one the dashboard uses
        from ray._private.state import available_resources_per_node

        return {k: dict(v) for k, v in available_resources_per_node().items()}
    except Exception:  # an older or newer Ray: fall back on the nodes' totals
        return {n["NodeID"]: dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")}


# -- the worker's side -----------------------------------------------------------------------------------------
@dataclass
class PoolTrainer:
    """The worker's `train` when jobs run on the pool: same signature and outcome as `api.train`, the work done
    by a `TrainerActor` on a node `choose_nodes` picks. `chip` keeps jobs on nodes of that catalog chip."""

    num_cpus: float = 1
    chip: str | None = None
    nodes: Callable[[], list[LiveNode]] = live_nodes
    lost_on: dict[str, set[str]] = field(default_factory=dict)  # job id -> nodes that lost it
    actors: dict[str, Any] = field(default_factory=dict)  # job id -> the actor training it now
    placed: list[tuple[str, str]] = field(default_factory=list)  # (job id, node name) of every start
    actor_class: type = TrainerActor

    def __call__(
        self,
        spec: api.TrainSpec,
        on_event: Callable[[api.TrainEvent], None],
        should_stop: Callable[[], bool],
    ) -> api.TrainResult:
        output_dir = Path(spec.output_dir)
        training = Path(spec.training_file).read_bytes()
        validation = Path(spec.validation_file).read_bytes() if spec.validation_file else None
        newest = api.newest_checkpoint(output_dir) if spec.resume else None
        resume = (newest.name, read_tree(newest)) if newest is not None else None
        job = spec.job_id or output_dir.name
        actor, node_id = self._start(spec, job, training, validation, resume, should_stop)
        try:
            return self._follow(actor, job, node_id, output_dir, on_event, should_stop)
        finally:
            import ray

            self.actors.pop(job, None)
            with contextlib.suppress(Exception):
                ray.get(actor.close.remote(), timeout=5)  # its scratch directory
            with contextlib.suppress(Exception):
                ray.kill(actor)

    def _start(
        self,
        spec: api.TrainSpec,
        job: str,
        training: bytes,
        validation: bytes | None,
        resume: tuple[str, Files] | None,
        should_stop: Callable[[], bool],
    ) -> tuple[Any, str]:
        """Starts the job's actor on the best node that has the base model. While no node has room the job
        waits here, claimed (its heartbeat beats on), until one has or the job is told to stop."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        need = training_memory_bytes(spec.model, spec.max_seq_len or 1024)
        while True:
            nodes = [n for n in self.nodes() if self.chip is None or n.chip == self.chip]
            order = choose_nodes(nodes, _free_resources(), need, self.num_cpus, self.lost_on.get(job, set()))
            if order:
                break
            if should_stop():
                raise TrainerLost("the job was stopped while it waited for a pool node")
            time.sleep(WAIT_S)
        why, missing_on = [], 0
        for node in order:
            actor = (
                ray.remote(self.actor_class)
                .options(
                    namespace=NAMESPACE,
                    num_cpus=self.num_cpus,
                    memory=need or None,
                    max_restarts=0,  # a lost node's job resumes where the worker places it next
                    max_concurrency=4,  # poll and stop while training runs on its thread
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(self.num_cpus)))}},
                )
                .remote()
            )
            try:
                ray.get(actor.ready.remote(), timeout=PLACE_TIMEOUT_S)  # not left pending on a node now full
                missing = ray.get(actor.has_model.remote(str(spec.model)), timeout=START_TIMEOUT_S)
                if missing is None:
                    ray.get(actor.start.remote(spec, training, validation, resume), timeout=START_TIMEOUT_S)
                    self.actors[job] = actor
                    self.placed.append((job, node.name))
                    log.info("job %s trains on node %s", job, node.name)
                    return actor, node.node_id
                why.append(f"{node.name}: {missing}")
                missing_on += 1
            except (ray.exceptions.RayError, TimeoutError) as exc:
                why.append(f"{node.name}: {_why(exc)}")
            with contextlib.suppress(Exception):
                ray.kill(actor)
        if missing_on == len(order):  # waiting or retrying will not bring the model: the job fails now
            raise TrainingFailed(
                "model_not_found", "no pool node has the base model (" + "; ".join(why) + ")"
            )
        raise TrainerLost("no pool node could take this job (" + "; ".join(why) + ")")

    def _follow(
        self,
        actor: Any,
        job: str,
        node_id: str,
        output_dir: Path,
        on_event: Callable[[api.TrainEvent], None],
        should_stop: Callable[[], bool],
    ) -> api.TrainResult:
        import ray

        stop_sent = False
        while True:
            try:
                items = ray.get(actor.poll.remote(POLL_S), timeout=POLL_S + CALL_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                self.lost_on.setdefault(job, set()).add(node_id)
                raise TrainerLost(f"the pool node training this job was lost: {_why(exc)}") from None
            for item in items:
                if item[0] == "event":
                    _, event, files = item
                    if files is not None:
                        event.checkpoint_dir = write_tree(
                            output_dir / "checkpoints" / event.checkpoint_dir.name, files
                        )
                    on_event(event)
                elif item[0] == "error":
                    raise TrainingFailed(item[1], item[2])
                else:
                    _, result, adapter, checkpoint = item
                    if (
                        checkpoint is not None
                    ):  # a stopped run's last state, for the next start to resume from
                        name, files = checkpoint
                        if not (output_dir / "checkpoints" / name / api.STATE).exists():
                            write_tree(output_dir / "checkpoints" / name, files)
                    result.adapter_dir = write_tree(output_dir / "adapter", adapter)
                    self.lost_on.pop(job, None)
                    return result
            if not stop_sent and should_stop():
                stop_sent = True
                with contextlib.suppress(Exception):
                    actor.stop.remote()


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
