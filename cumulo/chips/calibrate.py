"""Measure this machine (memory read bandwidth, matmul throughput per dtype, per-op latency) as the `local` chip.

Results are achieved rates, not peaks, so predictions for `local` apply no efficiency discount. The record is
written as JSON next to the other Cumulo data (`<data dir>/chips/local.json`) and merged into the catalog.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cumulo.chips.catalog import SKINNY_ROWS, local_chip_path

MATMUL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
STACK_MIN_MB = 64  # and the least weight one pass streams, MiB (twice a large last-level cache)
STACK_FLOPS = (
    4e9  # work (rows x weights x 2) one timed pass over a format curve's stack stops adding layers at
)
SKINNY_K = 1024  # the decode-shape matrices: K x K, a mid-size layer (SmolLM2: 576, Llama 3.1 8B: 4096)


@dataclass(frozen=True, slots=True)
class Calibration:
    device: str
    threads: int
    memory_bandwidth_gbs: float
    matmul_tflops: dict[str, float]  # compute dtype -> achieved TFLOP/s on a large square matmul
    skinny_tflops: dict[str, dict[int, float]]  # dtype or format -> rows M -> TFLOP/s of [M, K] x [K, N]
    op_latency_us: float
    memory_gb: float
    graph_op_latency_us: float | None = None  # per op of a recorded decode graph, where the platform has one


def _best_time(
    fn: Callable[[], object],
    sync: Callable[[], None],
    min_time: float,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    warm: bool = True,
) -> float:
    """Fastest of `repeats` timed runs, each long enough (>= min_time / repeats) to swamp timer noise."""
    if warm:
        fn()
        sync()
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, clock()
        while True:
            fn()
            n += 1
            sync()
            elapsed = clock() - start
            if elapsed >= min_time / repeats:
                break
        best = min(best, elapsed / n)
    return best


CURVE_ROUNDS = 5


def _curve(
    stacks: dict[int, tuple[Callable[[], object], float]],
    sync: Callable[[], None],
    min_time: float,
    clock: Callable[[], float],
) -> dict[int, float]:
    """TFLOP/s per row count, from {rows: (one pass over a stack, its FLOPs)}. Every point is timed once in each
    of CURVE_ROUNDS rounds that take the points in turn, and keeps its fastest: a host whose speed drifts over
    seconds (a shared VM) is sampled across its phases at every point, not one phase per point."""
    for fn, _ in stacks.values():
        fn()
        sync()
    best = dict.fromkeys(stacks, float("inf"))
    for _ in range(CURVE_ROUNDS):
        for m, (fn, _) in stacks.items():
            best[m] = min(best[m], _best_time(fn, sync, min_time / CURVE_ROUNDS, 1, clock, warm=False))
    return {m: flops / best[m] / 1e12 for m, (_, flops) in stacks.items()}


def _total_memory_gb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def measure(
    device: str = "cpu",
    bandwidth_mb: int = 256,
    matmul_n: int = 1024,
    min_time: float = 0.3,
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    formats: tuple[str, ...] = (),
) -> Calibration:
    """Measure `device`. `clock=time.process_time` with one torch thread gives the machine's unshared speed
    on a busy host (CPU time excludes the time other processes hold the cores)."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    # Read bandwidth: a reduction reads every byte once and writes nothing worth counting.
    x = torch.ones(bandwidth_mb * 2**20 // 4, dtype=torch.float32, device=device)
    t = _best_time(x.sum, sync, min_time, repeats, clock)
    bandwidth = x.numel() * 4 / t / 1e9
    del x  # free it before the matmuls allocate
    rates: dict[str, float] = {}
    for name, tname in MATMUL_DTYPES.items():
        dtype = getattr(torch, tname)
        try:
            a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
            b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
            t = _best_time(lambda a=a, b=b: a @ b, sync, min_time, repeats, clock)
        except RuntimeError:  # dtype without a matmul kernel on this device
            continue
        rates[name] = 2 * matmul_n**3 / t / 1e12
    # Decode multiplies a few rows by every weight matrix of a model in turn: measure that, as a stack of
    # separate K x K matrices streamed one after another (so cold starts count, as they do in a model), where
    # CPUs fall far below both their streaming bandwidth and their square-matmul peak.
    k = SKINNY_K
    skinny: dict[str, dict[int, float]] = {}
    for name in ("fp32", "bf16"):
        if name not in rates:
            continue
        dtype = getattr(torch, MATMUL_DTYPES[name])
        count = max(bandwidth_mb * 2**20 // (4 * k * k), 4)  # the same matrices for both dtypes
        layers = [_engine_linear(device, torch.randn(k, k, device=device).to(dtype)) for _ in range(count)]
        stacks = {
            m: (_stack(device, layers, torch.randn(m, k, device=device).to(dtype)), 2 * m * k * k * count)
            for m in SKINNY_ROWS
        }
        skinny[name] = _curve(stacks, sync, min_time, clock)
        del layers, stacks
    if formats:
        act = "bf16" if rates.get("bf16", 0.0) >= rates.get("fp32", 0.0) > 0 else "fp32"
        skinny.update(_format_curves(formats, act, device, sync, min_time, clock, bandwidth_mb))
    # Per-op overhead: the small elementwise ops and tiny matmuls that surround every layer's big matmuls.
    h = torch.randn(1, 576, device=device)
    g = torch.ones(576, device=device)
    small_w = torch.randn(64, 64, device=device)
    ops = [
        lambda: torch.rms_norm(h, (576,), g, 1e-6),
        lambda: torch.nn.functional.silu(h),
        lambda: h * h,
        lambda: h + h,
        lambda: torch.nn.functional.linear(h[:, :64], small_w),
    ]
    latency = sum(_best_time(op, sync, min_time / 10, repeats, clock) for op in ops) / len(ops)
    return Calibration(
        device, torch.get_num_threads(), bandwidth, rates, skinny, latency * 1e6, _total_memory_gb(device),
        _graph_op_latency(device, sync, min_time, repeats, clock),
    )  # fmt: skip


GRAPH_PROBE_OPS = 200


def _graph_op_latency(
    device: str, sync: Callable, min_time: float, repeats: int, clock: Callable
) -> float | None:
    """Seconds (as microseconds) per op of a recorded decode graph (Platform.graph_recorder), or None where the
    platform records none: the same small norm, replayed GRAPH_PROBE_OPS times in one graph."""
    import torch

    from cumulo.platform import get_platform

    recorder = get_platform(device).graph_recorder(torch.float32)
    if recorder is None:
        return None
    graph = recorder()
    h, g, y = torch.randn(1, 576), torch.ones(576), torch.empty(1, 576)
    for _ in range(GRAPH_PROBE_OPS):
        graph.rms_norm(h, g, y, 1e-6, 0.0)
    return _best_time(graph.run, sync, min_time / 10, repeats, clock) / GRAPH_PROBE_OPS * 1e6


def _engine_linear(device: str, weight) -> Callable:
    """A layer multiplying by `weight` [N, K] as the engine does for dense weights here: through the platform's
    decode kernel where it has one (it declines shapes it does not take), else F.linear."""
    from torch import nn

    from cumulo.formats.linear import DenseLinear
    from cumulo.platform import get_platform

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    kernel = get_platform(device).dense_linear(weight.dtype)
    return linear if kernel is None else DenseLinear(linear, kernel)


def _stack(device: str, layers: list, x) -> Callable[[], object]:
    """One call multiplying x by every layer in turn. Rows the engine decodes through a recorded graph (at most
    the decode graphs' batch, every layer with a recorded form) are timed the same way, replayed from a graph:
    the rate is then the kernels' own, without the per-call cost of Python, which the performance model
    counts separately (op_latency_us, graph_op_latency_us). Otherwise the layers are called one by one."""
    import torch

    from cumulo.engine.decode_graph import MAX_BATCH
    from cumulo.platform import get_platform

    recorder = get_platform(device).graph_recorder(x.dtype) if x.shape[0] <= MAX_BATCH else None
    if recorder is not None:
        graph = recorder()
        for layer in layers:
            y = torch.empty(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
            op = getattr(layer, "graph_op", lambda x, y: None)(x, y)
            if op is None:
                break
            graph.keep(layer, x, y)
            graph.add(op)
        else:
            return graph.run

    def eager() -> None:
        for layer in layers:
            layer(x)

    return eager


def _format_curves(
    formats: tuple[str, ...],
    act: str,
    device: str,
    sync: Callable[[], None],
    min_time: float,
    clock: Callable[[], float],
    stack_mb: int,
) -> dict[str, dict[int, float]]:
    """Rates of Cumulo's packed linear per compact format (a stack of about `stack_mb` MiB of 2048 x 2048 weights,
    `act` activations): the real emulation cost here, dequantization or fused kernel included. Formats the
    formats layer lacks are skipped."""
    import torch

    try:
        from cumulo.formats.linear import PackedLinear
    except ImportError:
        return {}
    dtype = getattr(torch, MATMUL_DTYPES[act])
    base = torch.nn.Linear(2048, 2048, bias=False).to(device)
    curves: dict[str, dict[int, float]] = {}
    for fmt in formats:
        try:
            layer = PackedLinear.from_linear(base, fmt).to(device)
            size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
            # Distinct copies, as many as the dense curves stream: the weights come from memory, as in a model.
            # (.to() also unbinds each copy's kernel, which would otherwise point at the first layer's buffers)
            layers = [copy.deepcopy(layer).to(device) for _ in range(max(4, stack_mb * 2**20 // size))]
            # Many rows make each layer compute-bound, where streaming them all from memory only costs time; but
            # never fewer than overflow a CPU's last-level cache, or the weights would come from there.
            least = -(-min(STACK_MIN_MB, stack_mb) * 2**20 // size)
            stacks = {}
            for m in SKINNY_ROWS:
                used = layers[: max(least, int(STACK_FLOPS // (2 * m * 2048 * 2048)))]
                x = torch.randn(m, 2048, device=device).to(dtype)
                stacks[m] = (_stack(device, used, x), 2 * m * 2048 * 2048 * len(used))
            curve = _curve(stacks, sync, min_time, clock)
        except Exception:  # noqa: BLE001 - a format this build cannot pack or run is simply not measured
            continue
        curves[fmt] = curve
    return curves


def to_record(cal: Calibration) -> dict:
    """The `local` chip in catalog form: every figure measured, sourced to this calibration."""

    def fig(value: float, note: str = "") -> dict:
        return {
            "value": round(value, 6),
            "provenance": "measured",
            "source": "local-calibration",
            "note": note,
        }

    fp32 = cal.matmul_tflops.get("fp32", 0.0)
    native = ["fp32"] + [d for d in ("bf16", "fp16") if cal.matmul_tflops.get(d, 0.0) >= fp32 > 0]
    record: dict = {
        "name": f"This machine ({platform.machine()} {cal.device}, {cal.threads} threads)",
        "vendor": "local",
        "year": datetime.now(UTC).year,
        "kind": "gpu" if cal.device.startswith("cuda") else "cpu",
        "datacenter": False,
        "achieved": True,
        "native": native,
        "memory_gb": fig(cal.memory_gb),
        "memory_bandwidth_gbs": fig(cal.memory_bandwidth_gbs, "float32 sum over a large tensor"),
        "op_latency_us": fig(cal.op_latency_us, "mean of small norm/activation/add ops, dispatch-bound"),
        **(
            {
                "graph_op_latency_us": fig(
                    cal.graph_op_latency_us, "a small norm replayed in a recorded decode graph"
                )
            }
            if cal.graph_op_latency_us is not None
            else {}
        ),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for dtype, curve in cal.skinny_tflops.items():
        for m, rate in curve.items():
            what = "linear" if dtype in MATMUL_DTYPES else "Cumulo packed linear (2048x2048)"
            record[f"{dtype}_m{m}_tflops"] = fig(rate, f"{dtype} {what}, {m} rows")
    for dtype, rate in cal.matmul_tflops.items():
        record["bf16_tflops" if dtype == "bf16" else f"{dtype}_tflops"] = fig(rate, f"{dtype} square matmul")
    record.pop("fp16_tflops", None)  # the catalog has one half-precision figure; bf16 is the one models use
    return record


def calibrate(device: str = "cpu", path: Path | None = None, **options: object) -> dict:
    """Measure and store the `local` chip; returns the record written. `options` go to `measure`."""
    record = to_record(measure(device, **options))  # type: ignore[arg-type]
    target = path or local_chip_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
