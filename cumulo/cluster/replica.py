"""`RayReplica`: an engine owned by a Ray actor on some node of the pool, reached through `EngineClient`.

The actor (`ReplicaActor`) builds the engine where Ray placed it, steps it on a thread (`AsyncEngine`), and
streams each request's deltas back as a Ray streaming generator. Replicas are named, detached actors in the
`cumulo` namespace, so a restarted gateway, or a second one, finds the same replicas by name.

If the actor or its node dies, every open stream and every later call raises `EngineUnavailable`: that is the
signal the pool (`cluster/pool.py`) fails over on. Bad input raises the engine's own `InvalidRequest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from cumulo.cluster.ray_cluster import NAMESPACE
from cumulo.contracts import EngineHealth, ModelInfo, RequestOutput, SamplingParams, Tokenizer
from cumulo.errors import CumuloError, EngineUnavailable

START_TIMEOUT_S = 900.0  # loading and converting a large model on a slow CPU takes minutes
CALL_TIMEOUT_S = 10.0  # health and abort: a replica that cannot answer this fast is treated as sick
DECODE_WINDOW = 64  # decode steps the measured speed in status() is averaged over


class ReplicaActor:
    """Runs inside the Ray actor: one engine, stepping on a thread, streaming deltas."""

    def __init__(
        self, model: str, factory: Callable[..., Any] | None, options: dict[str, Any], meta: dict[str, Any]
    ) -> None:
        import ray

        from cumulo.engine.async_engine import AsyncEngine

        if factory is None:
            from cumulo.engine.factory import create_engine
            from cumulo.engine.llm_engine import EngineConfig
            from cumulo.models import catalog, pull

            if model in catalog.CATALOG and not pull.is_pulled(model):
                pull.ensure(model, progress=False)  # a catalog model this node has not fetched yet
            stage_nodes = options.pop("stage_nodes", None)  # a split model: one Ray node id per stage
            stage_devices = options.pop("stage_devices", None)  # and, over one node's devices, which one
            if stage_nodes:
                engine, meta = _split_engine(model, EngineConfig(**options), stage_nodes, stage_devices, meta)
            else:
                engine = create_engine(model, EngineConfig(**options))
        else:
            engine = factory(**options)
        self.engine = AsyncEngine(engine)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.started = time.time()
        self.served = 0
        self.meta = meta  # what placement decided and why, for whoever lists the pool
        self.streams = 0  # requests streaming now
        self.decode: deque[tuple[float, int]] = deque(maxlen=DECODE_WINDOW)  # (s per token, streams then)
        self.decode_steps = 0

    def describe(self) -> tuple[ModelInfo, Tokenizer, str]:
        return self.engine.info, self.engine.tokenizer, self.node_id

    async def status(self) -> dict[str, Any]:
        health = await self.engine.health()
        return {**self.meta, "node_id": self.node_id, "started": self.started, "served": self.served,
                "ok": health.ok, "running": health.num_running, "waiting": health.num_waiting,
                "decode": self._decode_speed()}  # fmt: skip

    def _decode_speed(self) -> dict[str, float] | None:
        """Time per output token of one sequence over the last decode steps, the mean batch then, and how many
        steps were measured since the start (so a reader can tell new figures from old)."""
        if not self.decode:
            return None
        n = len(self.decode)
        return {"tpot_ms": sum(s for s, _ in self.decode) / n * 1e3, "batch": sum(b for _, b in self.decode) / n,
                "steps": self.decode_steps}  # fmt: skip

    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.served += 1
        self.streams += 1
        last = None
        try:
            async for out in self.engine.generate(prompt_token_ids, params, request_id):
                now = time.perf_counter()
                # the first output ends the prefill, not a decode step
                if last is not None and out.new_token_ids:
                    self.decode.append(((now - last) / len(out.new_token_ids), self.streams))
                    self.decode_steps += 1
                last = now
                yield out
        finally:
            self.streams -= 1

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def health(self) -> EngineHealth:
        return await self.engine.health()

    def stop(self) -> None:
        self.engine.shutdown()
        stages = getattr(self.engine.engine.runner, "stages", None)
        if hasattr(stages, "stop"):
            stages.stop()


def _exit_lost(why: str) -> None:
    """A split replica whose stage died cannot serve: it ends its own actor, so that the pool and the controller
    see a lost replica (streams move on, the replica is placed again), as when its node dies."""
    import logging
    import os

    logging.getLogger(__name__).error("%s; this replica exits", why)
    os._exit(1)


def _split_engine(
    model: str, config: Any, stage_nodes: list[str], stage_devices: list[str] | None, meta: dict[str, Any]
) -> tuple[Any, dict]:
    """The engine of a model split over Ray stage actors, one per node of `stage_nodes` (this actor drives
    them; `stage_devices`: each stage's device there), and `meta` with where each stage's layers went."""
    import dataclasses

    from cumulo.cluster.stage import RayStages
    from cumulo.engine.pipeline_factory import create_split_engine

    config.pipeline_stages = len(stage_nodes)
    holder: list[RayStages] = []

    def start(specs):
        if stage_devices:
            specs = [dataclasses.replace(s, device=d) for s, d in zip(specs, stage_devices, strict=True)]
        holder.append(RayStages.start(specs, stage_nodes))
        holder[0].on_lost = _exit_lost
        return holder[0]

    engine = create_split_engine(model, config, start)
    stages = [{"node_id": i.node_id, "layers": [i.layers.start, i.layers.stop], "weights_bytes": i.weights_bytes}
              for i in holder[0].infos]  # fmt: skip
    return engine, {**meta, "stages": stages}


def _remote_class():
    import ray

    return ray.remote(ReplicaActor)


class RayReplica:
    """The gateway's handle on one replica. Build with `start` (creates the actor, or finds it by name) or
    `attach` (finds an existing one)."""

    def __init__(self, name: str, handle: Any, info: ModelInfo, tokenizer: Tokenizer, node_id: str) -> None:
        self.name = name
        self.node_id = node_id
        self.info = info
        self.tokenizer = tokenizer
        self._actor = handle
        self._down: str | None = None

    @classmethod
    def start(
        cls,
        model: str,
        *,
        name: str,
        node_id: str | None = None,
        num_cpus: float = 1,
        resources: dict[str, float] | None = None,
        factory: Callable[..., Any] | None = None,
        timeout: float = START_TIMEOUT_S,
        meta: dict[str, Any] | None = None,
        **options: Any,
    ) -> RayReplica:
        """Creates replica `name` for `model` (on `node_id` when given) and waits until its engine has loaded;
        returns the existing replica of that name if there is one. `options` are `EngineConfig` fields."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else "DEFAULT"
        threads = options.get("threads")
        handle = (
            _remote_class()
            .options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=num_cpus,
                resources=resources or {},
                max_restarts=0,  # a lost replica is placed again by the controller, where placement says
                max_concurrency=1000,
                scheduling_strategy=strategy,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads or max(1, int(num_cpus)))}},
            )
            .remote(model, factory, options, meta or {})
        )
        return cls._described(name, handle, timeout)

    @classmethod
    def attach(cls, name: str, timeout: float = CALL_TIMEOUT_S) -> RayReplica | None:
        """The running replica called `name`, or None."""
        import ray

        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        try:
            return cls._described(name, handle, timeout)
        except EngineUnavailable:
            return None

    @classmethod
    def _described(cls, name: str, handle: Any, timeout: float) -> RayReplica:
        import ray

        try:
            info, tokenizer, node_id = ray.get(handle.describe.remote(), timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            with contextlib.suppress(Exception):
                ray.kill(handle)
            cause = exc.cause
            if isinstance(cause, CumuloError):
                raise cause from None
            raise EngineUnavailable(
                f"replica {name} failed to load: {type(cause).__name__}: {cause}"
            ) from None
        except (ray.exceptions.RayError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                ray.kill(handle)
            raise EngineUnavailable(f"replica {name} did not start: {_why(exc)}") from None
        return cls(name, handle, info, tokenizer, node_id)

    # -- the EngineClient interface -------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        import ray

        if self._down is not None:
            raise EngineUnavailable(self._down)
        params.validate()  # refuse bad parameters here, without a round trip
        request_id = request_id or uuid.uuid4().hex
        stream = self._actor.stream.options(num_returns="streaming").remote(
            request_id, list(prompt_token_ids), params
        )
        finished = False
        try:
            async for ref in stream:
                out: RequestOutput = await ref
                finished = out.finished
                yield out
                if finished:
                    return
        except ray.exceptions.RayTaskError as exc:
            finished = True  # the engine refused or failed the request: it holds nothing for it
            cause = exc.cause
            if isinstance(cause, CumuloError):
                raise cause from None
            raise EngineUnavailable(f"replica {self.name} failed: {type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayError as exc:
            finished = True
            self._down = f"replica {self.name} is lost: {_why(exc)}"
            raise EngineUnavailable(self._down) from None
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    ray.cancel(stream)
                with contextlib.suppress(Exception):
                    self._actor.abort.remote(request_id)

    async def status(self) -> dict[str, Any]:
        """What the replica says of itself: placement's reasons, node, load."""
        return await asyncio.wait_for(self._actor.status.remote(), CALL_TIMEOUT_S)

    async def abort(self, request_id: str) -> None:
        if self._down is None:
            with contextlib.suppress(Exception):
                self._actor.abort.remote(request_id)

    async def health(self) -> EngineHealth:
        import ray

        if self._down is not None:
            return EngineHealth(ok=False, detail=self._down)
        try:
            return await asyncio.wait_for(self._actor.health.remote(), CALL_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            if isinstance(exc, ray.exceptions.RayActorError):
                self._down = f"replica {self.name} is lost: {_why(exc)}"
            return EngineHealth(ok=False, detail=f"replica {self.name}: {_why(exc)}")

    def shutdown(self) -> None:
        """Stops the replica: its engine, then its actor."""
        import ray

        if self._down is None:
            self._down = f"replica {self.name} has shut down"
            with contextlib.suppress(Exception):
                ray.get(self._actor.stop.remote(), timeout=CALL_TIMEOUT_S)
        with contextlib.suppress(Exception):
            ray.kill(self._actor)

    def release(self) -> None:
        """Forgets the replica without stopping it (a gateway leaving a pool that others keep serving)."""
        self._down = self._down or f"replica {self.name} was released by this gateway"

    @property
    def alive(self) -> bool:
        return self._down is None


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def replica_statuses(timeout: float = CALL_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every replica in the pool (named actors of the `cumulo` namespace), with what it says of itself, or its
    state as "unreachable" when it does not answer."""
    import ray

    names = [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors()]
    refs = {}
    for name in names:
        if "#" not in name:
            continue
        with contextlib.suppress(Exception):
            refs[name] = ray.get_actor(name, namespace=NAMESPACE).status.remote()
    out = []
    for name, ref in refs.items():
        try:
            status = ray.get(ref, timeout=timeout)
            status["state"] = "ready" if status.pop("ok") else "unhealthy"
        except Exception as exc:
            status = {"model": name.rpartition("#")[0], "state": "unreachable", "error": _why(exc)}
        out.append({"replica": name, **status})
    return out
