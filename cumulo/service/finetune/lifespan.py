"""Local fine-tuning workers the gateway starts while it serves (`finetune_workers`, 1 under `cumulo serve`).

A worker is a separate process, `cumulo finetune worker`, because the service may not import the trainer or
the models. It gets this gateway's pid and exits when the gateway is gone, so a gateway killed with SIGKILL
leaves no orphan training; its job is requeued through the heartbeat (docs/finetune.md, "Durability").
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from cumulo.service.settings import Settings

log = logging.getLogger("cumulo.service.finetune")
Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


def worker_command(settings: Settings) -> list[str]:
    """`cumulo finetune worker` for this gateway; with `finetune_pool` it trains on the pool's nodes (the pool
    this gateway serves, found in the data directory)."""
    pool = ["--pool", "--pool-cpus", str(settings.finetune_pool_cpus)] if settings.finetune_pool else []
    return [
        sys.executable,
        "-m",
        "cumulo.cli.main",
        "--data-dir",
        str(settings.data_dir),
        "finetune",
        "worker",
        "--database-url",
        settings.database_url,
        "--parent-pid",
        str(os.getpid()),
        *pool,
    ]


def start_workers(settings: Settings) -> list[subprocess.Popen]:
    workers = []
    log_path = settings.data_dir / "finetune-worker.log"
    for _ in range(settings.finetune_workers):
        with open(log_path, "ab") as out:
            workers.append(subprocess.Popen(worker_command(settings), stdout=out, stderr=subprocess.STDOUT))
    return workers


def stop_workers(workers: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM: a worker puts its job back in the queue at the next step and exits."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("fine-tuning worker %d did not stop; killing it", worker.pid)
            worker.kill()
            worker.wait()


def with_finetune(inner: Lifespan) -> Lifespan:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with inner(app):
            workers = start_workers(app.state.service.settings)
            try:
                yield
            finally:
                await run_in_threadpool(stop_workers, workers)

    return lifespan
