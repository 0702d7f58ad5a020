"""The controller: turns stored deployments into replicas on the pool's nodes, and replicas into one `Pool` per
model that the gateway serves.

Every `period_s` it reads what is wanted (`load_wanted`, the gateway's view of the `deployments` table), what the
pool has (live nodes, replicas), and closes the gap:
- a missing replica is placed by `placement.place` (weights plus the engine's own KV cache must fit; the best
  predicted goodput under the SLO, corrected by what replicas measured; away from nodes that already hold one of
  the deployment) and started there;
- a replica whose node died, or that a stream found dead, leaves its pool and is placed again when capacity
  allows;
- the count of replicas moves between `min_replicas` and `max_replicas` as `autoscale.decide` says;
- a replica no longer wanted (undeployed, or scaled down) drains: no new request goes to it, and it stops once
  the requests it has end (none is cut).

Replicas are named `<model>#<slot>` and created with get-if-exists, so two gateways sharing one database and one
pool converge on the same replicas without a leader: whichever creates a slot first wins, the other attaches.

Ray is reached through three injectable callables (`start_replica`, `attach_replica`, `list_nodes`, defaulting to
`RayReplica.start`, `RayReplica.attach` and `live_nodes`), so tests drive `reconcile()` over fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cumulo.cluster.autoscale import Decision, Policy, ReplicaLoad, ScaleState, decide
from cumulo.cluster.placement import (
    DTYPE_FORMATS,
    MAX_NUM_SEQS,
    Corrections,
    DeploymentSpec,
    NodeSpec,
    Placement,
    place,
)
from cumulo.cluster.pool import Member, Pool
from cumulo.cluster.replica import DECODE_WINDOW, RayReplica
from cumulo.contracts import EngineClient
from cumulo.errors import CumuloError

log = logging.getLogger(__name__)

ENGINE_FORMATS = {"int8": "mxint8"}  # the chips model's name -> the engine's scheme of the same width
MIN_DECODE_STEPS = DECODE_WINDOW // 4  # new decode steps a replica must have measured before they count


@dataclass(frozen=True, slots=True)
class Wanted:
    """One stored deployment, as the controller needs it. `replicas` is the count to start with; the autoscaler
    keeps the count between `min_replicas` and `max_replicas` (None: `replicas`, a fixed count)."""

    model: str  # the name clients call
    source: str  # catalog name, .gguf file or model directory
    replicas: int
    format: str | None = None
    chip: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        low = self.replicas if self.min_replicas is None else self.min_replicas
        high = self.replicas if self.max_replicas is None else self.max_replicas
        return low, max(low, high)


@dataclass
class Slot:
    """One replica the controller keeps: where it was placed, and its client once started."""

    deployment: str
    index: int
    placement: Placement | None = None
    node_id: str | None = None
    replica: Any = None  # a RayReplica, or what `start_replica` returns
    state: str = "placing"  # placing | starting | ready | lost | failed | draining
    error: str = ""
    since: float = 0.0
    retry_at: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.deployment}#{self.index}"


@dataclass
class _Retiring:
    """A replica draining before it stops."""

    slot: Slot
    pool: Pool | None
    since: float


@dataclass(frozen=True, slots=True)
class LiveNode:
    node_id: str
    name: str
    chip: str
    devices: int
    memory_gb: float
    cores: int
    cpus: float
    labels: dict = field(default_factory=dict)

    def spec(self) -> NodeSpec:
        return NodeSpec(self.name, self.chip, self.devices, self.memory_gb)


class Controller:
    """Keeps the pool's replicas as the stored deployments say. `engines` is the dict the gateway serves from;
    the controller replaces it as a whole (`publish`) when a model's pool appears or goes.

    `reconcile()` is one pass; `start()` runs it every `period_s` on a thread of its own. It must not be called
    from a thread running an event loop (it asks the replicas for their status in a loop of its own)."""

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
        autoscale: Policy | None = None,
        corrections: Corrections | None = None,
        drain_timeout_s: float = 600.0,
        probe_timeout_s: float = 2.0,
        start_replica: Callable[..., Any] = RayReplica.start,
        attach_replica: Callable[..., Any] = RayReplica.attach,
        list_nodes: Callable[[], list[LiveNode]] | None = None,
        clock: Callable[[], float] = time.time,
        executor: Executor | None = None,
    ) -> None:
        self.load_wanted = load_wanted
        self.publish = publish
        self.period_s = period_s
        self.factory = factory
        self.engine_options = dict(engine_options or {})
        self.policy = policy
        self.retry_s = retry_s
        self.autoscale = autoscale or Policy()
        self.corrections = corrections or Corrections()
        self.drain_timeout_s = drain_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.start_replica = start_replica
        self.attach_replica = attach_replica
        self.list_nodes = list_nodes or live_nodes
        self.clock = clock
        self.pools: dict[str, Pool] = {}
        self.slots: dict[str, dict[int, Slot]] = {}
        self.wanted: dict[str, Wanted] = {}
        self.targets: dict[str, int] = {}  # the replica count kept now, per model
        self._scaling: dict[str, ScaleState] = {}
        self._decisions: dict[str, tuple[Decision, float]] = {}
        self._retiring: dict[str, _Retiring] = {}
        self._measured: dict[str, int] = {}  # replica name -> decode steps already folded into corrections
        self._lost: set[str] = set()  # replica names a stream found dead, reported from the event loop
        self._lost_lock = threading.Lock()
        self._starting: dict[str, Future] = {}
        self._pulls: dict[str, Future] = {}  # catalog models being fetched for placement
        self._executor = executor or ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="cumulo-replica-start"
        )
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
            kept = [s for slots in self.slots.values() for s in slots.values()]
            for slot in kept + [r.slot for r in self._retiring.values()]:
                if slot.replica is not None:
                    slot.replica.shutdown() if stop_replicas else slot.replica.release()

    # -- one pass -------------------------------------------------------------------------------------
    def reconcile(self) -> None:
        wanted = {w.model: w for w in self.load_wanted()}
        nodes = self.list_nodes()
        alive_ids = {n.node_id for n in nodes}
        lost = self._take_lost()
        with self._lock:
            self.wanted = wanted
            for model in list(self.slots):
                if model not in wanted:
                    self._retire(model)
            for model in wanted:
                self.slots.setdefault(model, {})
                self._collect_started(model)
                self._notice_losses(model, alive_ids, lost)
            self._finish_draining()
            ready = [s for slots in self.slots.values() for s in slots.values() if s.state == "ready"]
        statuses = self._probe(ready)  # outside the lock: it waits on the replicas
        with self._lock:
            self._learn(statuses)
            for model, want in wanted.items():
                target = self._scale(want, statuses)
                slots = self.slots[model]
                for index in sorted(slots, reverse=True):
                    if index >= target:
                        self._retire_slot(model, index)
                for index in range(target):
                    slot = (
                        slots.get(index)
                        or self._revive(model, index)
                        or slots.setdefault(index, Slot(model, index, since=self.clock()))
                    )
                    if slot.state in ("placing", "lost", "failed") and self.clock() >= slot.retry_at:
                        self._place_and_start(want, slot, nodes)
                self._collect_started(model)
            self._finish_draining()  # a replica retired idle stops in the pass that retired it

    def _collect_started(self, model: str) -> None:
        for slot in self.slots[model].values():
            future = self._starting.get(slot.name)
            if future is None or not future.done():
                continue
            del self._starting[slot.name]
            try:
                replica = future.result()
            except Exception as exc:
                slot.state, slot.error, slot.retry_at = "failed", str(exc), self.clock() + self.retry_s
                log.warning("replica %s did not start: %s", slot.name, exc)
                continue
            slot.replica, slot.node_id = replica, replica.node_id
            slot.state, slot.since = "ready", self.clock()
            self._measured.pop(slot.name, None)  # a new replica counts its decode steps from zero
            member = Member(slot.name, self._node_name(slot), replica, "ready")
            pool = self.pools.get(model)
            if pool is None:
                pool = Pool(
                    replica.info, replica.tokenizer, policy=self.policy, on_member_lost=self._report_lost
                )
                pool.add(member)
                self.pools[model] = pool
                self._publish()
            else:
                pool.add(member)
            log.info("replica %s ready on %s", slot.name, self._node_name(slot))

    def _notice_losses(self, model: str, alive_ids: set[str], lost_now: set[str]) -> None:
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
            slot.replica, slot.state, slot.error, slot.since = None, "lost", why, self.clock()

    def _take_lost(self) -> set[str]:
        with self._lost_lock:
            lost, self._lost = self._lost, set()
        return lost

    def _report_lost(self, name: str) -> None:  # from the event loop: must not wait for a controller pass
        with self._lost_lock:
            self._lost.add(name)

    def _pull_pending(self, source: str) -> str | None:
        """Why a catalog model the gateway has not fetched cannot be placed yet (placement reads its shape): the
        pull is started on first ask, off the controller's thread. None once the model is here."""
        from cumulo.chips.presets import PRESETS
        from cumulo.models import catalog, pull

        if source not in catalog.CATALOG or source in PRESETS or pull.is_pulled(source):
            return None  # a preset's shape is known without its file; the replica's node fetches that itself
        pulling = self._pulls.get(source)
        if pulling is not None and pulling.done() and pulling.exception() is not None:
            del self._pulls[source]  # tried again at the slot's next retry
            return f"could not pull {source}: {pulling.exception()}"
        if pulling is None:
            self._pulls[source] = self._executor.submit(pull.ensure, source, progress=False)
        return f"pulling {source}"

    def _place_and_start(self, want: Wanted, slot: Slot, nodes: list[LiveNode]) -> None:
        if slot.name in self._retiring:  # the replica of that name from before still drains: wait for it
            slot.error = f"waiting for the previous {slot.name} to drain"
            return
        existing = self.attach_replica(slot.name, timeout=30) if slot.state == "placing" else None
        if existing is not None:  # another gateway (or this one before a restart) started it
            future: Future = Future()
            future.set_result(existing)
            self._starting[slot.name] = future
            slot.state = "starting"
            self._collect_started(want.model)
            return
        pending = self._pull_pending(want.source)
        if pending is not None:
            failed = pending.startswith("could not")
            slot.state = "failed" if failed else "placing"
            slot.error, slot.retry_at = pending, self.clock() + (self.retry_s if failed else 1.0)
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
                corrections=self.corrections,
                hosting=hosting,
            )[0]
        except CumuloError as exc:
            slot.state, slot.error, slot.retry_at = "failed", str(exc), self.clock() + self.retry_s
            return
        node = next(n for n in nodes if n.name == placement.node)
        slot.placement, slot.node_id, slot.state, slot.error = placement, node.node_id, "starting", ""
        options = {**self.engine_options, **engine_options_for(placement, node, stored_format(want.source))}
        options.update(split_options(placement, nodes))
        meta = {"model": want.model, "node": node.name, "chip": placement.chip, "format": placement.format,
                "reason": placement.reason}  # fmt: skip
        # A split replica's driver only schedules and samples: its stages take the CPUs (cluster/stage.py).
        num_cpus = 0 if "stage_nodes" in options else 1
        self._starting[slot.name] = self._executor.submit(
            self.start_replica, want.source, name=slot.name, node_id=node.node_id, num_cpus=num_cpus,
            factory=self.factory, meta=meta, **options,
        )  # fmt: skip

    def _replicas_on(self, node: str) -> int:
        """Replicas this controller runs, starts or drains on `node` (each takes one of its CPUs)."""
        return sum(1 for s in self._holding() if self._node_name(s) == node)

    def _used_memory(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for s in self._holding():
            if s.placement is not None:
                p = s.placement
                for node, gb in [(st.node, st.gb) for st in p.stages] or [(p.node, p.weights_gb + p.kv_gb)]:
                    used[node] = used.get(node, 0.0) + gb
        return used

    def _holding(self) -> list[Slot]:
        """Slots whose replica holds a node's CPU and memory now."""
        kept = [
            s for slots in self.slots.values() for s in slots.values() if s.state in ("starting", "ready")
        ]
        return kept + [r.slot for r in self._retiring.values()]

    # -- retiring ---------------------------------------------------------------------------------------
    def _retire(self, model: str) -> None:
        pool = self.pools.pop(model, None)
        if pool is not None:
            self._publish()  # new requests for the model are refused; the open ones continue on the pool
        for index in list(self.slots.get(model, {})):
            self._retire_slot(model, index, pool)
        self.slots.pop(model, None)
        self.targets.pop(model, None)
        self._scaling.pop(model, None)

    def _retire_slot(self, model: str, index: int, pool: Pool | None = None) -> None:
        """Takes the slot out of the kept ones; its replica drains (`_finish_draining` stops it)."""
        slot = self.slots[model].pop(index)
        future = self._starting.pop(slot.name, None)
        if future is not None:  # started but not collected: stop it once it is up
            future.add_done_callback(_shutdown_started)
        if slot.replica is None:
            return
        pool = pool or self.pools.get(model)
        if pool is not None and any(m["name"] == slot.name for m in pool.status()):
            pool.set_state(slot.name, "draining")
        else:
            pool = None
        slot.state, slot.since = "draining", self.clock()
        self._retiring[slot.name] = _Retiring(slot, pool, self.clock())
        log.info("replica %s drains", slot.name)

    def _finish_draining(self) -> None:
        """Stops each draining replica whose requests have all ended (or that is gone, or past the timeout)."""
        for name, r in list(self._retiring.items()):
            member = None
            if r.pool is not None:
                member = next((m for m in r.pool.status() if m["name"] == name), None)
            busy = member is not None and member["in_flight"] > 0 and member["state"] == "draining"
            if busy and r.slot.replica.alive and self.clock() - r.since < self.drain_timeout_s:
                continue
            if member is not None:
                with contextlib.suppress(CumuloError, KeyError):
                    r.pool.remove(name)  # type: ignore[union-attr]
            with contextlib.suppress(Exception):
                r.slot.replica.shutdown()
            del self._retiring[name]
            self._measured.pop(name, None)
            log.info("replica %s stopped", name)

    def _revive(self, model: str, index: int) -> Slot | None:
        """A slot wanted again while its replica still drains in the model's pool: it serves again."""
        name = f"{model}#{index}"
        r = self._retiring.get(name)
        pool = self.pools.get(model)
        if r is None or pool is None or r.pool is not pool or not r.slot.replica.alive:
            return None
        del self._retiring[name]
        pool.set_state(name, "ready")
        r.slot.state = "ready"
        self.slots[model][index] = r.slot
        log.info("replica %s serves again", name)
        return r.slot

    # -- measuring and scaling --------------------------------------------------------------------------
    def _probe(self, slots: list[Slot]) -> dict[str, dict]:
        """What each ready replica says of itself (load, measured decode speed); none for one that does not
        answer within `probe_timeout_s`."""
        if not slots:
            return {}

        async def one(slot: Slot) -> tuple[str, Any]:
            try:
                return slot.name, await asyncio.wait_for(slot.replica.status(), self.probe_timeout_s)
            except Exception:
                return slot.name, None

        async def every() -> list[tuple[str, Any]]:
            return await asyncio.gather(*(one(s) for s in slots))

        return {name: status for name, status in asyncio.run(every()) if isinstance(status, dict)}

    def _learn(self, statuses: dict[str, dict]) -> None:
        """Folds each replica's newly measured decode speed into the corrections placement uses: measured over
        predicted tokens/s of one sequence, at the batch the replica ran."""
        for model, slots in self.slots.items():
            want = self.wanted.get(model)
            for slot in slots.values():
                decode = (statuses.get(slot.name) or {}).get("decode")
                p = slot.placement
                if want is None or p is None or not decode:
                    continue
                steps, seen = int(decode["steps"]), self._measured.get(slot.name, 0)
                if steps - seen < MIN_DECODE_STEPS or decode["tpot_ms"] <= 0:
                    continue
                self._measured[slot.name] = steps
                batch = max(1, round(decode["batch"]))
                try:
                    prompt, output = workload_shape(want.source)
                    predicted = predicted_tpot_ms(want.source, p.format, p.chip, batch, prompt + output)
                except CumuloError:
                    continue
                factor = self.corrections.record(
                    want.source, p.chip, p.format, 1 / decode["tpot_ms"], 1 / predicted
                )
                log.info("%s on %s (%s) measured %.1f ms per token at batch %d, predicted %.1f: correction %.2f",
                         slot.name, p.chip, p.format, decode["tpot_ms"], batch, predicted, factor)  # fmt: skip

    def _scale(self, want: Wanted, statuses: dict[str, dict]) -> int:
        """The replica count to keep for `want` now, as `autoscale.decide` says; records why."""
        low, high = want.bounds
        model = want.model
        current = self.targets.get(model, want.replicas) if low < high else want.replicas
        pool_status = {m["name"]: m for m in (self.pools[model].status() if model in self.pools else [])}
        loads, batches, ttfts = [], [], []
        for slot in self.slots[model].values():
            if slot.state != "ready":
                continue
            status = statuses.get(slot.name) or {}
            in_flight = pool_status.get(slot.name, {}).get("in_flight", 0)
            running, waiting = int(status.get("running", 0)), int(status.get("waiting", 0))
            loads.append(ReplicaLoad(requests=max(in_flight, running + waiting), waiting=waiting))
            if slot.placement is not None:
                batches.append(slot.placement.max_sequences)
                ttfts.append(slot.placement.predicted_ttft_ms)
        decision = decide(
            loads, current, low, high,
            max_sequences=sum(batches) / len(batches) if batches else MAX_NUM_SEQS,
            predicted_ttft_ms=sum(ttfts) / len(ttfts) if ttfts else None,
            ttft_slo_ms=want.ttft_slo_ms, now=self.clock(), state=self._scaling.get(model, ScaleState()),
            policy=self.autoscale,
        )  # fmt: skip
        if decision.wanted != current:
            log.info("%s: %d -> %d replicas: %s", model, current, decision.wanted, decision.reason)
        self._scaling[model] = decision.state
        self._decisions[model] = (decision, self.clock())
        self.targets[model] = decision.wanted
        return decision.wanted

    def _publish(self) -> None:
        self.publish(dict(self.pools))

    def _node_name(self, slot: Slot) -> str:
        return slot.placement.node if slot.placement is not None else (slot.node_id or "")[:12]

    # -- views ----------------------------------------------------------------------------------------
    def replicas(self, model: str | None = None) -> list[dict]:
        """Each replica with its node, state and why placement put it there (`cumulo deployments`)."""
        out = []
        with self._lock:
            rows = [(m, s) for m, slots in self.slots.items() for s in slots.values()]
            rows += [(r.slot.deployment, r.slot) for r in self._retiring.values()]
            for name, slot in rows:
                if model is not None and name != model:
                    continue
                pool = self.pools.get(name)
                if slot.name in self._retiring:
                    pool = self._retiring[slot.name].pool
                member = next((m for m in (pool.status() if pool else []) if m["name"] == slot.name), {})
                p = slot.placement
                decision = self._decisions.get(name)
                out.append({
                    "model": name, "replica": slot.name, "node": self._node_name(slot),
                    "state": member.get("state", slot.state), "chip": p.chip if p else None,
                    "format": p.format if p else None, "in_flight": member.get("in_flight", 0),
                    "served": member.get("served", 0), "reason": p.reason if p else "",
                    "error": slot.error, "since": slot.since, "scaling": decision[0].reason if decision else "",
                })  # fmt: skip
        return out

    def decisions(self) -> list[dict]:
        """Per deployment: the replica count kept, its bounds, and the autoscaler's last word on it."""
        with self._lock:
            out = []
            for model, (decision, at) in self._decisions.items():
                want = self.wanted.get(model)
                if want is None:
                    continue
                low, high = want.bounds
                out.append({"model": model, "replicas": decision.wanted, "min_replicas": low,
                            "max_replicas": high, "reason": decision.reason,
                            "predicted_ttft_ms": decision.predicted_ttft_ms, "at": at})  # fmt: skip
            return out


def _shutdown_started(future: Future) -> None:
    with contextlib.suppress(Exception):
        future.result().shutdown()


@lru_cache(maxsize=1024)
def predicted_tpot_ms(source: str, fmt: str, chip: str, batch: int, context: int) -> float:
    """What the chips model predicts one sequence's time per output token to be, uncorrected."""
    from cumulo.chips.predict import predict

    return predict(source, fmt, chip, batch, context).tpot_s * 1e3


def workload_shape(source: str) -> tuple[int, int]:
    """The (prompt, output) tokens goodput is judged on: 512 + 128, or less for a model whose context is
    shorter."""
    from cumulo.models.loader import load_config

    try:
        context = load_config(source).max_position_embeddings
    except CumuloError:
        return 512, 128
    return min(512, context // 2), min(128, context // 4)


def stored_format(source: str) -> str | None:
    """The compact format `source`'s checkpoint is stored in (None: plain weights, a preset, or unreadable)."""
    from cumulo.models.loader import load_config

    try:
        return load_config(source).stored_format
    except CumuloError:
        return None


def engine_options_for(p: Placement, node: LiveNode, stored: str | None = None) -> dict[str, Any]:
    """EngineConfig fields that make the replica what placement predicted: its format, its KV cache. A
    replica placed in the format its checkpoint is `stored` in converts nothing: it loads the packed weights."""
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
    elif p.format != stored:
        options["format"] = ENGINE_FORMATS.get(p.format, p.format)
    return options


def split_options(p: Placement, nodes: list[LiveNode]) -> dict[str, Any]:
    """The replica options of a split placement: the Ray node of each stage (`stage_nodes`, one per stage;
    the same node repeated for a split over one node's devices), the speed weights its layers were split by,
    and every stage's cache as placement sized it. Nothing for a replica on one device."""
    if p.stages:
        ids = {n.name: n.node_id for n in nodes}
        return {
            "stage_nodes": [ids[s.node] for s in p.stages],
            "stage_weights": tuple(float(s.layers[1] - s.layers[0]) for s in p.stages),  # the layers it chose
            "kv_cache_blocks": p.kv_blocks,
        }
    if p.devices > 1:  # one stage per device of one node, in equal shares as placement assumed
        node = next(n for n in nodes if n.name == p.node)
        kind = node.labels.get("cumulo-kind", "cpu")
        devices = [kind if kind == "cpu" else f"{kind}:{i}" for i in range(p.devices)]
        # every stage keeps the blocks placement sized for the whole replica, each for its own layers only
        return {
            "stage_nodes": [node.node_id] * p.devices,
            "stage_devices": devices,
            "kv_cache_blocks": p.kv_blocks,
        }
    return {}


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
