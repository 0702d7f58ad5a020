"""Fakes of what the controller reaches through Ray, so its tests drive `reconcile()` in process: nodes listed
from a plain list, replicas that are tiny in-process engines under a replica's name, an executor that starts them
at once, and a clock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future
from typing import Any

from cumulo.cluster.controller import Controller, LiveNode, Wanted
from cumulo.contracts import EngineHealth, RequestOutput, SamplingParams
from cumulo.engine.async_engine import AsyncEngine
from cumulo.errors import EngineUnavailable
from tests.support.tiny import make_tiny_engine


def node(name: str, chip: str = "cpu-avx512-32core", memory_gb: float = 8.0, cpus: float = 4) -> LiveNode:
    return LiveNode(f"id-{name}", name, chip, 1, memory_gb, int(cpus), cpus)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InlineExecutor(Executor):
    """Runs what it is given at once, so one `reconcile()` starts a replica and sees it ready."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


class FakeReplica:
    """A tiny in-process engine dressed as a `RayReplica`: name, node, status with load and decode speed."""

    def __init__(self, name: str, node_id: str, options: dict[str, Any]) -> None:
        self.name = name
        self.node_id = node_id
        self.options = options
        self.engine = AsyncEngine(make_tiny_engine())
        self.info = self.engine.info
        self.tokenizer = self.engine.tokenizer
        self.down: str | None = None
        self.stopped = False  # shutdown() was called
        self.load: tuple[int, int] | None = None  # (running, waiting) to report instead of the engine's
        self.decode: dict[str, float] | None = None  # what status() reports as measured decode speed

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self.down is not None:
            raise EngineUnavailable(self.down)
        async for out in self.engine.generate(prompt_token_ids, params, request_id):
            yield out

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def health(self) -> EngineHealth:
        if self.down is not None:
            return EngineHealth(ok=False, detail=self.down)
        return await self.engine.health()

    async def status(self) -> dict[str, Any]:
        if self.down is not None:
            raise EngineUnavailable(self.down)
        health = await self.engine.health()
        running, waiting = self.load or (health.num_running, health.num_waiting)
        return {"running": running, "waiting": waiting, "decode": self.decode}

    def die(self) -> None:
        self.down = f"replica {self.name} is lost"

    def shutdown(self) -> None:
        self.stopped = True
        self.down = self.down or f"replica {self.name} has shut down"
        self.engine.shutdown()

    def release(self) -> None:
        self.down = self.down or "released"

    @property
    def alive(self) -> bool:
        return self.down is None


class FakeLauncher:
    """`start` and `attach` as `RayReplica`'s: one replica per name (get-if-exists), started on the node asked."""

    def __init__(self) -> None:
        self.running: dict[str, FakeReplica] = {}
        self.started: list[FakeReplica] = []  # every replica started, in order
        self.fail: str | None = None  # when set, start raises this

    def start(self, model: str, *, name: str, node_id: str | None = None, **options: Any) -> FakeReplica:
        if self.fail is not None:
            raise EngineUnavailable(self.fail)
        existing = self.running.get(name)
        if existing is not None and existing.alive:
            return existing
        replica = FakeReplica(name, node_id or "", options)
        self.running[name] = replica
        self.started.append(replica)
        return replica

    def attach(self, name: str, timeout: float = 0) -> FakeReplica | None:
        replica = self.running.get(name)
        return replica if replica is not None and replica.alive else None

    def live(self) -> list[FakeReplica]:
        return [r for r in self.running.values() if r.alive]

    def stop_all(self) -> None:
        for replica in self.started:
            if not replica.stopped:
                replica.shutdown()


class Rig:
    """A controller over fakes: `wanted` and `nodes` are plain lists a test changes between passes."""

    def __init__(self, wanted: list[Wanted], nodes: list[LiveNode], model: str, **options: Any) -> None:
        self.model = model
        self.wanted = wanted
        self.nodes = nodes
        self.engines: dict = {}
        self.clock = Clock()
        self.launcher = FakeLauncher()
        self.controller = Controller(
            lambda: self.wanted, self.publish, start_replica=self.launcher.start,
            attach_replica=self.launcher.attach, list_nodes=lambda: list(self.nodes), clock=self.clock,
            executor=InlineExecutor(), **options,
        )  # fmt: skip

    def publish(self, engines: dict) -> None:
        self.engines = engines

    def reconcile(self) -> None:
        self.controller.reconcile()

    def rows(self, state: str | None = None) -> list[dict]:
        return [r for r in self.controller.replicas(self.model) if state is None or r["state"] == state]
