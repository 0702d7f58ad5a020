"""Where a deployment's replicas go: on which node, in which number format, on how many devices, with how big a
KV cache; and, as a baseline, memory-fit first-fit bin packing as GPUStack does it.

A replica fits where its weights plus the KV cache its engine will really allocate fit (`size_kv_cache`, the
engine's own arithmetic). Among fits, `place` takes the best goodput under the SLO as `cumulo.chips.predict`
predicts it, corrected by what replicas measured (`Corrections`): goodput is the largest batch whose TTFT and
TPOT meet the SLO, times the tokens per second at that batch. Pure functions: no Ray, no devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from cumulo.chips.catalog import Chip, get_chip
from cumulo.chips.predict import Prediction, predict
from cumulo.chips.presets import PRESETS, ModelShape, resolve_model
from cumulo.cluster.split_placement import SplitPlan, StagePlacement, place_over_nodes
from cumulo.engine.kv_sizing import KVPlan, kv_elements_per_token, size_kv_cache, size_kv_cache_for
from cumulo.engine.llm_engine import EngineConfig
from cumulo.errors import InvalidRequest
from cumulo.models.config import ModelConfig
from cumulo.platform.budget import (
    ACCELERATOR_DEFAULT_FRACTION,
    CPU_DEFAULT_FRACTION,
    CPU_DEFAULT_GIB,
    GIB,
)

# Formats tried, best first, when a deployment names none: among them, those the chip multiplies natively.
# 4-bit formats change answers enough that they are only used when asked for.
SERVING_FORMATS = ("fp8", "int8", "bf16", "fp16", "fp32")
DTYPE_FORMATS = ("fp32", "bf16", "fp16")  # "formats" that are an engine dtype, not packed weights
# What an engine's cache may take of the memory left after its weights (the engine's default on accelerators).
KV_FRACTION = ACCELERATOR_DEFAULT_FRACTION
BLOCK_SIZE = EngineConfig().block_size
MAX_NUM_SEQS = EngineConfig().max_num_seqs  # the engine runs at most this many sequences per step


class PlacementError(InvalidRequest):
    """A deployment that does not fit the pool; the message says what did not fit where, and why."""

    code = "placement_failed"


@dataclass(frozen=True)
class NodeSpec:
    """What a node offers: `devices` of one catalog chip, each with `memory_gb` free for engines."""

    name: str
    chip: str  # catalog chip id, e.g. "cpu-avx2-2core", "ascend-910b"
    devices: int
    memory_gb: float  # per device
    usd_per_hour: float | None = (
        None  # per device; None: the catalog's price and power, as predict costs them
    )


@dataclass(frozen=True)
class DeploymentSpec:
    model: str | ModelConfig  # a preset name, a model path, or a ModelConfig (what predict accepts)
    replicas: int = 1
    format: str | None = None  # None: the best format each chip runs natively
    chip: str | None = None  # only nodes of this catalog chip
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    prompt_tokens: int = 512  # the workload shape goodput is judged on
    output_tokens: int = 128


@dataclass(frozen=True)
class Placement:
    """One replica's decision. `kv_gb` and `max_sequences` are what to give its engine (`kv_cache_gib`,
    `max_num_seqs`); `max_sequences` is the largest batch that meets the SLO (that fits, without one)."""

    replica: int
    node: str
    chip: str
    format: str
    devices: int
    weights_gb: float
    kv_gb: float
    max_sequences: int
    predicted_goodput_tok_s: float
    predicted_ttft_ms: float
    predicted_tpot_ms: float
    reason: str
    usd_per_hour: float | None = None
    max_model_len: int = 0
    kv_block_size: int = BLOCK_SIZE
    kv_cache_bytes: int = 0  # exactly kv_gb: the engine given kv_cache_gib allocates these bytes
    # A model no single node holds, split over several (`split_placement`): one entry per stage, in order;
    # `node` is then the first stage's node. `kv_blocks`: the cache's blocks (of every stage, when split).
    stages: tuple[StagePlacement, ...] = ()
    kv_blocks: int = 0

    @property
    def kv_cache_gib(self) -> float:
        return self.kv_cache_bytes / GIB


class Corrections:
    """Measured / predicted speed per (model, chip, format), smoothed (EWMA): production pools learn how far
    the performance model is off on each pairing, and placement divides predicted times by the factor."""

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise InvalidRequest(f"correction smoothing must be in (0, 1], not {alpha}")
        self.alpha = alpha
        self._ratio: dict[tuple[str, str, str], float] = {}

    def record(
        self, model: str | ModelConfig, chip: str, format: str, measured: float, predicted: float
    ) -> float:
        """Fold in one observation of a speed (tokens/s) measured where `predicted` was predicted."""
        if measured <= 0 or predicted <= 0:
            raise InvalidRequest("measured and predicted speeds must be positive")
        key = (model_name(model), chip, format)
        ratio = measured / predicted
        old = self._ratio.get(key)
        self._ratio[key] = ratio if old is None else (1 - self.alpha) * old + self.alpha * ratio
        return self._ratio[key]

    def factor(self, model: str | ModelConfig, chip: str, format: str) -> float:
        return self._ratio.get((model_name(model), chip, format), 1.0)


def model_name(model: str | ModelConfig) -> str:
    return (
        (model.name or model.architecture) if isinstance(model, ModelConfig) else str(model).strip().lower()
    )


Factor = Callable[[str, str], float]  # (chip, format) -> measured / predicted speed


def _no_correction(chip: str, fmt: str) -> float:
    return 1.0


@dataclass(frozen=True)
class _Option:  # one way to run a replica on one node
    node: NodeSpec
    format: str
    native: bool
    devices: int
    weights_gb: float
    kv: KVPlan
    kv_bytes: int
    batch: int
    goodput: float
    ttft_ms: float
    tpot_ms: float
    meets_slo: bool
    usd_per_hour: float | None


def place(
    dep: DeploymentSpec,
    nodes: list[NodeSpec],
    used: dict[str, float] | None = None,
    corrections: Corrections | None = None,
    hosting: tuple[str, ...] = (),
) -> list[Placement]:
    """Place every replica of `dep`, best predicted goodput under the SLO first, each on a node no other
    replica of it is on (`hosting`: nodes that already run one) unless no other node fits.

    `used`: GB already taken per node. Raises `PlacementError` saying what did not fit where.
    """
    name, dep = model_name(dep.model), _check(dep)
    free = _free_devices(nodes, used)
    factor = (lambda chip, fmt: corrections.factor(name, chip, fmt)) if corrections else _no_correction
    on: dict[str, int] = {name: -1 for name in hosting}  # node -> replica index already there
    out: list[Placement] = []
    for replica in range(dep.replicas):
        options, why_not = _options(dep, nodes, free, factor, dep.format)
        if not options:
            split = place_over_nodes(dep, nodes, free, factor, _predict, _kv_budget, _chip)
            if split is None:
                raise PlacementError(_no_fit(dep, replica, why_not))
            out.append(_split_placement(replica, dep, split, nodes))
            for stage in split.stages:
                free[stage.node][0] -= (
                    stage.gb
                )  # a stage takes the node's roomiest device (CPU nodes have one)
            continue
        fresh = [o for o in options if o.node.name not in on]
        pool = fresh or options
        best = max(pool, key=_goodness)
        reason = _reason(dep, best, len({o.node.name for o in options}))
        if not fresh:
            other = on[best.node.name]
            with_what = f"replica {other}" if other >= 0 else "a replica placed earlier"
            reason += f"; shares node {best.node.name} with {with_what}: no other node fits"
        out.append(_placement(replica, best, reason))
        on.setdefault(best.node.name, replica)
        _take(free, best)
    return out


def binpack(
    dep: DeploymentSpec, nodes: list[NodeSpec], used: dict[str, float] | None = None
) -> list[Placement]:
    """GPUStack-style baseline: the format asked for (bf16, the checkpoint's, when none), the engine's default
    cache, the first node in the list where memory fits; no performance model, no spreading."""
    dep = _check(dep)
    free = _free_devices(nodes, used)
    fmt = dep.format or "bf16"
    nobody = replace(dep, replicas=1, format=fmt, ttft_slo_ms=None, tpot_slo_ms=None)
    out: list[Placement] = []
    for replica in range(dep.replicas):
        options, why_not = _options(nobody, nodes, free, _no_correction, fmt)
        if not options:
            raise PlacementError(_no_fit(dep, replica, why_not))
        first = options[0]  # _options keeps the nodes' order
        # Judge it on the deployment's SLO, as place() is judged, with the batch its full cache allows.
        judged = _judge(dep, first.node, first.format, first.devices, first.kv, first.weights_gb, fill=True)
        out.append(_placement(replica, judged, f"first node where {fmt} weights and the cache fit"))
        _take(free, judged)
    return out


# -- options ------------------------------------------------------------------------------------------------
def _check(dep: DeploymentSpec) -> DeploymentSpec:
    """`dep` with a model path read into its ModelConfig (presets stay names: they have no config). A checkpoint
    stored in a compact format (`cumulo convert`, DeepSeek's block FP8) is placed in that format, the bytes its
    engine will hold, unless a dtype is asked for; another compact format is refused (its linears are packed
    already: convert the source instead)."""
    if dep.replicas < 1:
        raise InvalidRequest(f"replicas must be at least 1, not {dep.replicas}")
    if dep.prompt_tokens < 1 or dep.output_tokens < 1:
        raise InvalidRequest("prompt_tokens and output_tokens must be at least 1")
    model = dep.model
    if isinstance(model, str) and model.strip().lower() not in PRESETS:
        from cumulo.models.loader import load_config

        model = load_config(model)
    fmt = dep.format
    if isinstance(model, ModelConfig):
        seq_tokens = dep.prompt_tokens + dep.output_tokens
        if seq_tokens > model.max_position_embeddings:
            raise InvalidRequest(
                f"{seq_tokens} prompt and output tokens exceed the model's context {model.max_position_embeddings}"
            )
        stored = model.stored_format
        if stored and fmt is None:
            fmt = stored
        elif stored and fmt not in (stored, *DTYPE_FORMATS):
            raise InvalidRequest(
                f"{model.name or dep.model} is stored in {stored}: deploy it as stored (no format) or convert its "
                f"source to {fmt}"
            )
    return replace(dep, model=model, format=fmt)


def _free_devices(nodes: list[NodeSpec], used: dict[str, float] | None) -> dict[str, list[float]]:
    """GB free on each device of each node; `used` GB on a node is taken from its devices in order."""
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise InvalidRequest("node names must be unique")
    free: dict[str, list[float]] = {}
    for node in nodes:
        taken = (used or {}).get(node.name, 0.0)
        devs = []
        for _ in range(node.devices):
            t = min(taken, node.memory_gb)
            devs.append(node.memory_gb - t)
            taken -= t
        free[node.name] = devs
    return free


def _take(free: dict[str, list[float]], o: _Option) -> None:
    devs = free[o.node.name]
    share = (o.weights_gb + o.kv_bytes / 1e9) / o.devices
    for i in sorted(range(len(devs)), key=lambda i: -devs[i])[: o.devices]:
        devs[i] -= share


def _formats(dep: DeploymentSpec, chip: str, asked: str | None) -> list[str]:
    if asked:
        return [asked]
    native = [f for f in SERVING_FORMATS if f in _chip(chip).native]
    if "bf16" in native and "fp16" in native:
        native.remove("fp16")  # same cost; bf16 is the safer range
    return native or ["fp32"]


def _options(
    dep: DeploymentSpec,
    nodes: list[NodeSpec],
    free: dict[str, list[float]],
    factor: Factor,
    asked: str | None,
) -> tuple[list[_Option], list[str]]:
    """Every (node, format) that fits, on the fewest devices of the node that hold it; and why the others not."""
    options: list[_Option] = []
    why_not: list[str] = []
    chips = {n.chip for n in nodes}
    if dep.chip and dep.chip not in chips:
        have = ", ".join(f"{n.name}: {n.chip}" for n in nodes) or "no nodes"
        raise PlacementError(f"no node has chip '{dep.chip}' ({have})")
    for node in nodes:
        if dep.chip and node.chip != dep.chip:
            continue
        for fmt in _formats(dep, node.chip, asked):
            got = _fit(dep, node, fmt, free[node.name], factor(node.chip, fmt))
            if isinstance(got, str):
                if not any(w.startswith(f"{node.name} (") for w in why_not):  # the most compact format's
                    why_not.append(f"{node.name} ({node.chip}, {fmt}): {got}")
            else:
                options.append(got)
    return options, why_not


def _kv_budget(chip: str, left_gb: float) -> int:
    """Bytes of KV cache a replica gets from `left_gb` of memory after its weights, as its engine's platform
    would size it: 80% on an accelerator; on a CPU, whose memory the OS and every other process share, the
    engine's CPU default (the smaller of 4 GiB and a quarter)."""
    left = left_gb * 1e9
    if _chip(chip).kind == "cpu":
        return int(min(CPU_DEFAULT_GIB * GIB, CPU_DEFAULT_FRACTION * left))
    return int(KV_FRACTION * left)


def _fit(dep: DeploymentSpec, node: NodeSpec, fmt: str, devs: list[float], factor: float) -> _Option | str:
    """The option on the fewest devices of `node` that hold the weights and one sequence's cache, or why not."""
    seq_tokens = dep.prompt_tokens + dep.output_tokens
    largest = sorted(devs, reverse=True)
    weights = _predict(dep.model, fmt, node.chip, 1, seq_tokens, 1).weights_gb
    can_split = bool(_chip(node.chip).get("interconnect_gbs"))
    for n in range(1, (len(devs) if can_split else 1) + 1):
        pred = _predict(dep.model, fmt, node.chip, 1, seq_tokens, n)
        left = n * largest[n - 1] - pred.weights_gb  # a split puts an equal share on the n roomiest devices
        if left <= 0:
            continue
        kv = _kv(dep.model, pred, _kv_budget(node.chip, left))
        if kv.num_blocks // math.ceil(seq_tokens / kv.block_size) >= 1:
            return _judge(dep, node, fmt, n, kv, pred.weights_gb, factor)
    why = f"weights {weights:.1f} GB and the cache for one {seq_tokens}-token sequence do not fit in "
    if len(devs) == 1:
        return why + f"{devs[0]:.1f} GB free"
    if not can_split:
        return why + (
            f"one device's {largest[0]:.1f} GB free, and {node.chip} has no chip-to-chip bandwidth in the "
            "catalog to split a model over its devices"
        )
    return why + f"{sum(devs):.1f} GB free over {len(devs)} devices"


@lru_cache(maxsize=64)
def _chip(chip: str) -> Chip:
    return get_chip(chip)  # predict would read the catalog again on every call


@lru_cache(maxsize=8192)
def _predict_shape(shape: ModelShape, fmt: str, chip: str, batch: int, context: int, n: int) -> Prediction:
    return predict(shape, fmt, _chip(chip), batch, context, n_chips=n, parallel="pp" if n > 1 else "tp")


def _predict(model: str | ModelConfig, fmt: str, chip: str, batch: int, context: int, n: int) -> Prediction:
    return _predict_shape(resolve_model(model), fmt, chip, batch, context, n)


def _kv(model: str | ModelConfig, pred: Prediction, budget: int) -> KVPlan:
    """The engine's cache in `budget` bytes, in the activation dtype predict assumes for this compute dtype."""
    dtype = torch.float32 if pred.compute_dtype == "fp32" else torch.bfloat16
    if isinstance(model, ModelConfig):
        return size_kv_cache(budget, model, dtype, BLOCK_SIZE)
    shape = resolve_model(model)  # a preset knows no context: the cache decides it
    return size_kv_cache_for(budget, int(shape.kv_elems_per_token), None, dtype, BLOCK_SIZE)


def _bytes_per_block(model: str | ModelConfig, kv: KVPlan) -> int:
    per_token = (
        kv_elements_per_token(model)
        if isinstance(model, ModelConfig)
        else int(resolve_model(model).kv_elems_per_token)
    )
    return per_token * kv.block_size * kv.dtype.itemsize


def _judge(
    dep: DeploymentSpec,
    node: NodeSpec,
    fmt: str,
    n: int,
    kv: KVPlan,
    weights_gb: float,
    factor: float = 1.0,
    fill: bool = False,
) -> _Option:
    """Goodput on `n` devices of `node` with cache `kv`: the largest batch that fits and meets the SLO, times
    its tokens/s (predicted, times the correction `factor`). Unless `fill`, the cache shrinks to that batch's
    need when an SLO bounds it, leaving the rest of the memory to other replicas."""
    one = _predict(dep.model, fmt, node.chip, 1, dep.prompt_tokens + dep.output_tokens, n)
    seq_tokens = dep.prompt_tokens + dep.output_tokens
    per_seq = math.ceil(seq_tokens / kv.block_size)
    fits = max(1, min(kv.num_blocks // per_seq, MAX_NUM_SEQS))

    def at(batch: int) -> tuple[float, float, bool]:  # (ttft ms, tpot ms, meets the SLO)
        first = _predict(dep.model, fmt, node.chip, batch, dep.prompt_tokens, n)
        full = _predict(dep.model, fmt, node.chip, batch, seq_tokens, n)
        ttft, tpot = first.ttft_s * 1e3 / factor, full.tpot_s * 1e3 / factor
        meets = (dep.ttft_slo_ms is None or ttft <= dep.ttft_slo_ms) and (
            dep.tpot_slo_ms is None or tpot <= dep.tpot_slo_ms
        )
        return ttft, tpot, meets

    lo, hi = 0, fits  # lo: the largest batch known to meet the SLO (times grow with the batch)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if at(mid)[2]:
            lo = mid
        else:
            hi = mid - 1
    batch = max(lo, 1)
    ttft, tpot, meets = at(batch)
    slo = dep.ttft_slo_ms is not None or dep.tpot_slo_ms is not None
    if slo and meets and not fill and batch < fits:
        kv = _kv(dep.model, one, batch * per_seq * _bytes_per_block(dep.model, kv))
    usd = node.usd_per_hour * n if node.usd_per_hour is not None else _usd_per_hour(one)
    return _Option(
        node=node,
        format=fmt,
        native=one.native,
        devices=n,
        weights_gb=weights_gb,
        kv=kv,
        kv_bytes=kv.num_blocks * _bytes_per_block(dep.model, kv),
        batch=batch,
        goodput=batch / tpot * 1e3 if meets else 0.0,
        ttft_ms=ttft,
        tpot_ms=tpot,
        meets_slo=meets,
        usd_per_hour=usd,
    )


def _usd_per_hour(pred: Prediction) -> float | None:
    """What predict charges for the chips this prediction uses, per hour (price amortised, plus power)."""
    if pred.usd_per_million_tokens is None:
        return None
    return pred.usd_per_million_tokens * pred.decode_tok_s * 3600 / 1e6


def _goodness(o: _Option) -> tuple:
    rank = SERVING_FORMATS.index(o.format) if o.format in SERVING_FORMATS else len(SERVING_FORMATS)
    return (o.goodput, -o.tpot_ms, -(o.usd_per_hour or 0.0), -rank, -o.devices)


# -- words ------------------------------------------------------------------------------------------------
def _reason(dep: DeploymentSpec, o: _Option, fitting: int) -> str:
    chip = o.node.chip
    if dep.format:
        stored = isinstance(dep.model, ModelConfig) and dep.format == dep.model.stored_format
        fmt = f"{o.format} as {'stored' if stored else 'asked'}"
        fmt += "" if o.native else f" (emulated: {chip} has no native {o.format})"
    elif "fp8" not in _chip(chip).native:
        fmt = f"{chip} has no fp8: {o.format} chosen"
    else:
        fmt = f"{o.format} chosen ({chip} runs it natively)"
    parts = [fmt]
    if o.devices > 1:
        parts.append(
            f"split over {o.devices} devices of {o.node.name} (pipeline parallel): too large for one"
        )
    nodes = f"{fitting} fitting node{'s' if fitting != 1 else ''}"
    if dep.ttft_slo_ms is None and dep.tpot_slo_ms is None:
        parts.append(f"no SLO: best throughput at the largest batch that fits ({o.batch}) among {nodes}")
    elif o.meets_slo:
        parts.append(f"best goodput under the SLO among {nodes} (batch {o.batch} meets it)")
    else:
        parts.append(f"no fitting node meets the SLO even at batch 1: the fastest of {nodes}")
    return "; ".join(parts)


def _no_fit(dep: DeploymentSpec, replica: int, why_not: list[str]) -> str:
    head = f"cannot place replica {replica + 1} of {dep.replicas} of {model_name(dep.model)}"
    if replica:
        head += " (the replicas before it took the room)"
    if isinstance(dep.model, ModelConfig):
        tail = "; nor do the nodes together hold it split over them (pipeline parallel, in a dtype or its stored format)"
    else:  # a preset has a shape but no layers to split
        tail = "; a model known only by its preset is split only over the devices of one node, not over nodes"
    return f"{head}: " + ("; ".join(why_not) if why_not else "no nodes") + tail


def _split_placement(replica: int, dep: DeploymentSpec, split: SplitPlan, nodes: list[NodeSpec]) -> Placement:
    first = next(n for n in nodes if n.name == split.stages[0].node)
    assert isinstance(dep.model, ModelConfig)
    return Placement(
        replica=replica,
        node=first.name,
        chip=first.chip,
        format=split.format,
        devices=1,
        weights_gb=split.weights_gb,
        kv_gb=sum(s.gb for s in split.stages) - split.weights_gb,
        max_sequences=split.batch,
        predicted_goodput_tok_s=split.goodput,
        predicted_ttft_ms=split.ttft_ms,
        predicted_tpot_ms=split.tpot_ms,
        reason=split.reason,
        max_model_len=min(dep.model.max_position_embeddings, split.kv_blocks * BLOCK_SIZE),
        kv_block_size=BLOCK_SIZE,
        stages=split.stages,
        kv_blocks=split.kv_blocks,
    )


def _placement(replica: int, o: _Option, reason: str) -> Placement:
    return Placement(
        replica=replica,
        node=o.node.name,
        chip=o.node.chip,
        format=o.format,
        devices=o.devices,
        weights_gb=o.weights_gb,
        kv_gb=o.kv_bytes / 1e9,
        max_sequences=o.batch,
        predicted_goodput_tok_s=o.goodput,
        predicted_ttft_ms=o.ttft_ms,
        predicted_tpot_ms=o.tpot_ms,
        reason=reason,
        usd_per_hour=o.usd_per_hour,
        max_model_len=o.kv.max_model_len,
        kv_block_size=o.kv.block_size,
        kv_cache_bytes=o.kv_bytes,
        kv_blocks=o.kv.num_blocks,
    )
