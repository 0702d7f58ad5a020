"""The controller: turns stored deployments into replicas on the pool's nodes, and replicas into one `Pool` per
model that the gateway serves.

Every `period_s` it reads what is wanted (`load_wanted`, the gateway's view of the `deployments` table), what the
pool has (live Ray nodes, named replica actors), and closes the gap:
- a missing replica is placed by `placement.place` (weights plus the engine's own KV cache must fit; the best
  predicted goodput under the SLO; away from nodes that already hold one of the deployment) and started there;
- a replica whose node died, or that a stream found dead, leaves its pool and is placed again when capacity
  allows;
- an undeployed model's pool leaves the gateway; its replicas drain (no request is cut) and stop.

Replicas are named `<model>#<slot>` and created with get-if-exists, so two gateways sharing one database and one
pool converge on the same replicas without a leader: whichever creates a slot first wins, the other attaches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cumulo.cluster.placement import DeploymentSpec, NodeSpec, Placement, place
from cumulo.cluster.pool import Member, Pool
from cumulo.cluster.replica import RayReplica
from cumulo.contracts import EngineClient
from cumulo.errors import CumuloError

log = logging.getLogger(__name__)

DTYPE_FORMATS = ("fp32", "bf16", "fp16")  # placement's "formats" that are an engine dtype, not packed weights
ENGINE_FORMATS = {"int8": "mxint8"}  # the chips model's name -> the engine's scheme of the same width


@dataclass(frozen=True, slots=True)
class Wanted:
    """One stored deployment, as the controller needs it."""

    model: str  # the name clients call
    source: str  # catalog name, .gguf file or model directory
    replicas: int
    format: str | None = None
    chip: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None


@dataclass
class Slot:
    """One replica the controller keeps: where it was placed, and its client once started."""

    deployment: str
    index: int
    placement: Placement | None = None
    node_id: str | None = None
    replica: RayReplica | None = None
    state: str = "placing"  # placing | starting | ready | lost | failed
    error: str = ""
    since: float = field(default_factory=time.time)
    retry_at: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.deployment}#{self.index}"


@dataclass(frozen=True, slots=True)
class LiveNode:
    node_id: str
    name: str
    chip: str
    devices: int
    memory_gb: float
    cores: int
    cpus: float
    labels: dict

    def spec(self) -> NodeSpec:
        return NodeSpec(self.name, self.chip, self.devices, self.memory_gb)


class Controller:
    """Keeps the pool's replicas as the stored deployments say. `engines` is the dict the gateway serves from;
    the controller replaces it as a whole (`publish`) when a model's pool appears or goes."""

    def __init__(
        self,
        load_wanted: Callable[[], list[Wanted]],
        publish: Callable[[dict[str, EngineClient]], None],
        *,
        period_s: float = 1.0,
        factory: Callable[..., Any] | None = None,
        engine_options: dict[str, Any] | None = None,
        policy: str = "prefix",
        retry_s: float = 5.0,
    ) -> None:
        self.load_wanted = load_wanted
        self.publish = publish
        self.period_s = period_s
        self.factory = factory
        self.engine_options = dict(engine_options or {})
        self.policy = policy
        self.retry_s = retry_s
        self.pools: dict[str, Pool] = {}
        self.slots: dict[str, dict[int, Slot]] = {}
        self.wanted: dict[str, Wanted] = {}
        self._lost: set[str] = set()  # replica names a stream found dead, reported from the event loop
        self._starting: dict[str, Future] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cumulo-replica-start")
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cumulo-controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:
                log.exception("controller pass failed")
            self._stop.wait(self.period_s)

    def stop(self, stop_replicas: bool = False) -> None:
        """Stops reconciling. Replicas keep running for the other gateways unless `stop_replicas`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for slots in self.slots.values():
                for slot in slots.values():
                    if slot.replica is not None:
                        slot.replica.shutdown() if stop_replicas else slot.replica.release()

    # -- one pass -------------------------------------------------------------------------------------
    def reconcile(self) -> None:
        wanted = {w.model: w for w in self.load_wanted()}
        nodes = live_nodes()
        alive_ids = {n.node_id for n in nodes}
        with self._lock:
            self.wanted = wanted
            for model in list(self.slots):
                if model not in wanted:
                    self._retire(model)
            for model, want in wanted.items():
                slots = self.slots.setdefault(model, {})
                self._collect_started(model)
                self._notice_losses(model, alive_ids)
                for index in list(slots):
                    if index >= want.replicas:
                        self._retire_slot(model, index)
                for index in range(want.replicas):
                    slot = slots.setdefault(index, Slot(model, index))
                    if slot.state in ("placing", "lost", "failed") and time.time() >= slot.retry_at:
                        self._place_and_start(want, slot, nodes)

    def _collect_started(self, model: str) -> None:
        for slot in self.slots[model].values():
            future = self._starting.get(slot.name)
            if future is None or not future.done():
                continue
            del self._starting[slot.name]
            try:
                replica: RayReplica = future.result()
            except Exception as exc:
                slot.state, slot.error, slot.retry_at = "failed", str(exc), time.time() + self.retry_s
                log.warning("replica %s did not start: %s", slot.name, exc)
                continue
            slot.replica, slot.node_id, slot.state, slot.since = (
                replica,
                replica.node_id,
                "ready",
                time.time(),
            )
            pool = self.pools.get(model)
            if pool is None:
                pool = Pool(
                    replica.info, replica.tokenizer, policy=self.policy, on_member_lost=self._report_lost
                )
                self.pools[model] = pool
                pool.add(Member(slot.name, self._node_name(slot), replica, "ready"))
                self._publish()
            else:
                pool.add(Member(slot.name, self._node_name(slot), replica, "ready"))
            log.info("replica %s ready on %s", slot.name, self._node_name(slot))

    def _notice_losses(self, model: str, alive_ids: set[str]) -> None:
        lost_now = self._take_lost()
        for slot in self.slots[model].values():
            if slot.state != "ready" or slot.replica is None:
                continue
            dead = slot.name in lost_now or not slot.replica.alive or slot.node_id not in alive_ids
            if not dead:
                continue
            why = "its node left the pool" if slot.node_id not in alive_ids else "a stream found it dead"
            log.warning("replica %s lost (%s); placing it again", slot.name, why)
            pool = self.pools.get(model)
            if pool is not None:
                with contextlib.suppress(CumuloError, KeyError):
                    pool.remove(slot.name)
            with contextlib.suppress(Exception):
                slot.replica.shutdown()  # kills the actor if it still exists, freeing its name
            slot.replica, slot.state, slot.error, slot.since = None, "lost", why, time.time()
        self._lost |= {n for n in lost_now if not n.startswith(f"{model}#")}

    def _take_lost(self) -> set[str]:
        with self._lock:
            lost, self._lost = self._lost, set()
        return lost

    def _report_lost(self, name: str) -> None:
        with self._lock:
            self._lost.add(name)

    def _place_and_start(self, want: Wanted, slot: Slot, nodes: list[LiveNode]) -> None:
        existing = RayReplica.attach(slot.name, timeout=30) if slot.state == "placing" else None
        if existing is not None:  # another gateway (or this one before a restart) started it
            future: Future = Future()
            future.set_result(existing)
            self._starting[slot.name] = future
            slot.state = "starting"
            self._collect_started(want.model)
            return
        hosting = tuple(
            self._node_name(s)
            for s in self.slots[want.model].values()
            if s is not slot and s.state in ("starting", "ready")
        )
        try:
            prompt, output = workload_shape(want.source)
            placement = place(
                DeploymentSpec(
                    want.source, 1, want.format, want.chip, want.ttft_slo_ms, want.tpot_slo_ms, prompt, output
                ),  # fmt: skip
                [n.spec() for n in nodes if n.cpus - self._replicas_on(n.name) >= 1],
                used=self._used_memory(),
                hosting=hosting,
            )[0]
        except CumuloError as exc:
            slot.state, slot.error, slot.retry_at = "failed", str(exc), time.time() + self.retry_s
            return
        if placement.devices > 1:
            slot.state, slot.retry_at = "failed", time.time() + self.retry_s
            slot.error = (f"{want.model} needs {placement.devices} devices of {placement.node} (pipeline "
                          "parallel); serving a split model is not built yet")  # fmt: skip
            return
        node = next(n for n in nodes if n.name == placement.node)
        slot.placement, slot.node_id, slot.state, slot.error = placement, node.node_id, "starting", ""
        options = {**self.engine_options, **engine_options_for(placement, node)}
        meta = {"model": want.model, "node": node.name, "chip": placement.chip, "format": placement.format,
                "reason": placement.reason}  # fmt: skip
        self._starting[slot.name] = self._executor.submit(
            RayReplica.start, want.source, name=slot.name, node_id=node.node_id, num_cpus=1,
            factory=self.factory, meta=meta, **options,
        )  # fmt: skip

    def _replicas_on(self, node: str) -> int:
        """Replicas this controller runs or is starting on `node` (each takes one of its CPUs)."""
        return sum(
            1
            for slots in self.slots.values()
            for s in slots.values()
            if s.state in ("starting", "ready") and self._node_name(s) == node
        )

    def _used_memory(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for slots in self.slots.values():
            for s in slots.values():
                if s.placement is not None and s.state in ("starting", "ready"):
                    p = s.placement
                    used[p.node] = used.get(p.node, 0.0) + p.weights_gb + p.kv_gb
        return used

    def _retire(self, model: str) -> None:
        pool = self.pools.pop(model, None)
        if pool is not None:
            self._publish()
        for index in list(self.slots.get(model, {})):
            self._retire_slot(model, index, pool)
        self.slots.pop(model, None)

    def _retire_slot(self, model: str, index: int, pool: Pool | None = None) -> None:
        slot = self.slots[model].pop(index)
        pool = pool or self.pools.get(model)
        replica = slot.replica
        if replica is None:
            return
        if pool is not None and any(m["name"] == slot.name for m in pool.status()):
            drain(pool, slot.name)
            with contextlib.suppress(CumuloError, KeyError):
                pool.remove(slot.name)
        replica.shutdown()

    def _publish(self) -> None:
        self.publish(dict(self.pools))

    def _node_name(self, slot: Slot) -> str:
        return slot.placement.node if slot.placement is not None else (slot.node_id or "")[:12]

    # -- views ----------------------------------------------------------------------------------------
    def replicas(self, model: str | None = None) -> list[dict]:
        """Each replica with its node, state and why placement put it there (`cumulo deployments`)."""
        out = []
        with self._lock:
            for name, slots in self.slots.items():
                if model is not None and name != model:
                    continue
                pool_status = {
                    m["name"]: m for m in (self.pools[name].status() if name in self.pools else [])
                }
                for slot in slots.values():
                    p = slot.placement
                    member = pool_status.get(slot.name, {})
                    out.append({
                        "model": name, "replica": slot.name, "node": self._node_name(slot),
                        "state": member.get("state", slot.state), "chip": p.chip if p else None,
                        "format": p.format if p else None, "in_flight": member.get("in_flight", 0),
                        "served": member.get("served", 0), "reason": p.reason if p else "",
                        "error": slot.error, "since": slot.since,
                    })  # fmt: skip
        return out


def workload_shape(source: str) -> tuple[int, int]:
    """The (prompt, output) tokens goodput is judged on: 512 + 128, or less for a model whose context is
    shorter."""
    from cumulo.models.loader import load_config

    try:
        context = load_config(source).max_position_embeddings
    except CumuloError:
        return 512, 128
    return min(512, context // 2), min(128, context // 4)


def drain(pool: Pool, name: str, timeout: float = 600.0) -> None:
    """From the controller's thread: no new requests go to the member; waits until the ones it has end."""
    pool.set_state(name, "draining")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        member = next((m for m in pool.status() if m["name"] == name), None)
        if member is None or member["in_flight"] == 0:
            return
        time.sleep(0.1)


def engine_options_for(p: Placement, node: LiveNode) -> dict[str, Any]:
    """EngineConfig fields that make the replica what placement predicted: its format, its KV cache."""
    options: dict[str, Any] = {
        "kv_cache_gib": max(p.kv_cache_gib, 0.01),
        "max_num_seqs": max(1, p.max_sequences),
        "block_size": p.kv_block_size,
        "threads": max(1, node.cores),
    }
    if p.format in DTYPE_FORMATS:
        options["dtype"] = (
            p.format if node.labels.get("cumulo-kind") != "cpu" or p.format != "fp16" else "fp32"
        )
    else:
        options["format"] = ENGINE_FORMATS.get(p.format, p.format)
    return options


def live_nodes() -> list[LiveNode]:
    """The pool's alive nodes, as their labels describe them (`cluster/nodes.py`)."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        labels = dict(n.get("Labels") or {})
        resources = n.get("Resources") or {}
        name = labels.get("cumulo-name") or n["NodeID"][:12]
        out.append(LiveNode(
            node_id=n["NodeID"], name=name, chip=labels.get("cumulo-chip", "cpu-avx2-2core"),
            devices=int(labels.get("cumulo-devices", "1") or 1),
            memory_gb=float(labels.get("cumulo-memory-gb") or resources.get("memory", 0) / 1024**3),
            cores=int(labels.get("cumulo-cores") or resources.get("CPU", 1)), cpus=float(resources.get("CPU", 0)),
            labels=labels,
        ))  # fmt: skip
    return out
