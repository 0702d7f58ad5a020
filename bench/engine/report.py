"""Turns the engine benchmark's results into a printed table, ratios against llama.cpp, roofline fractions,
a JSON record and a PNG plot under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

from bench.chips.bandwidth import MachineRoofs
from bench.common import RESULTS_DIR, SystemResult, Workload

LLAMA_CPP_SYSTEMS = ("llama-cpp-python", "llama-server", "llama-bench")
# Targets from issue 2: (metric, reference system, minimum ratio).
TARGETS = (
    ("decode_tok_s", "llama-bench", 0.6),
    ("decode_tok_s", "hf", 4.0),
    ("prefill_tok_s", "llama-bench", 1.5),
    ("throughput@16", "llama-server", 1.5),
    ("throughput@64", "llama-server", 2.0),
)


def bytes_per_token(model: Path, system: str, cumulo_dtype: str) -> float:
    """Weight bytes one decode step reads: every tensor once, except an untied input embedding (one row).

    llama.cpp reads the file's own (quantized) bytes; HF holds fp32; Cumulo holds its chosen dtype.
    KV-cache reads are left out: at these short contexts they are a few percent of the weights.
    """
    from gguf import GGUFReader  # noqa: PLC0415

    tensors = GGUFReader(str(model)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    total = 0.0
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            continue
        if system in LLAMA_CPP_SYSTEMS:
            total += int(t.n_bytes)
        else:
            total += int(t.n_elements) * (2 if system == "cumulo" and cumulo_dtype == "bfloat16" else 4)
    return total


def _metric(r: SystemResult, name: str) -> float | None:
    if name.startswith("throughput@"):
        return r.throughput_tok_s.get(name.split("@")[1])
    return getattr(r, name)


def _reference(
    by_name: dict[str, SystemResult], preferred: tuple[str, ...], metric: str
) -> SystemResult | None:
    for name in preferred:
        r = by_name.get(name)
        if r is not None and _metric(r, metric) is not None:
            return r
    return None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def render_table(results: list[SystemResult], workload: Workload, roofs: MachineRoofs | None) -> str:
    by_name = {r.system: r for r in results}
    metrics = ["decode_tok_s", "prefill_tok_s"] + [f"throughput@{c}" for c in workload.concurrency]
    heads = ["decode", "prefill"] + [f"out@{c}" for c in workload.concurrency]
    lines = [
        f"{'system':<17}"
        + "".join(f"{h:>9}" for h in heads)
        + f"{'TTFT ms':>9}{'roof %':>8}{'peak MiB':>10}",
    ]
    for r in results:
        if r.error:
            lines.append(f"{r.system:<17}ERROR: {r.error.splitlines()[0][:150]}")
            continue
        roof = None
        if roofs and r.decode_tok_s and r.bytes_per_token:
            roof = 100 * r.decode_tok_s * r.bytes_per_token / (roofs.read_gb_s * 1e9)
        lines.append(
            f"{r.system:<17}"
            + "".join(f"{_fmt(_metric(r, m)):>9}" for m in metrics)
            + f"{_fmt(r.ttft_s and r.ttft_s * 1000):>9}{_fmt(roof):>8}{_fmt(r.peak_rss_mib, '.0f'):>10}"
        )
    lines.append(
        "(tokens/s; out@C = output tokens/s with C sequences in flight, prefill included; roof % = decode "
        "tok/s as a share of read-bandwidth / weight-bytes-per-token)"
    )

    # Ratios: decode and prefill against llama.cpp measuring itself, throughput against its server.
    refs = {m: _reference(by_name, ("llama-bench", "llama-cpp-python"), m) for m in metrics[:2]}
    refs.update({m: _reference(by_name, ("llama-server", "llama-bench"), m) for m in metrics[2:]})
    lines.append("")
    lines.append(
        "ratio vs llama.cpp ("
        + ", ".join(f"{h}: {refs[m].system if refs[m] else '-'}" for h, m in zip(heads, metrics, strict=True))
        + ")"
    )
    for r in results:
        if r.error:
            continue
        cells = []
        for m in metrics:
            ref, mine = refs[m], _metric(r, m)
            ratio = None if ref is None or mine is None else mine / _metric(ref, m)
            cells.append(f"{_fmt(ratio, '.2f') + 'x' if ratio is not None else '-':>9}")
        lines.append(f"{r.system:<17}" + "".join(cells))
    cumulo = by_name.get("cumulo")
    if cumulo is not None and not cumulo.error:
        lines.append("")
        lines.append("Cumulo against issue 2's targets:")
        for metric, ref_name, need in TARGETS:
            ref = by_name.get(ref_name)
            mine, theirs = _metric(cumulo, metric), ref and _metric(ref, metric)
            if mine is None or not theirs:
                lines.append(f"  {metric} vs {ref_name}: not measured")
                continue
            ratio = mine / theirs
            verdict = "met" if ratio >= need else f"MISSED by {100 * (1 - ratio / need):.0f}%"
            lines.append(f"  {metric} vs {ref_name}: {ratio:.2f}x (target >= {need}x) {verdict}")
    return "\n".join(lines)


def _plot(results: list[SystemResult], workload: Workload, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ok = [r for r in results if not r.error]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        cs = sorted(int(c) for c in r.throughput_tok_s)
        if cs:
            left.plot(cs, [r.throughput_tok_s[str(c)] for c in cs], marker="o", label=r.system)
    left.set_xscale("log", base=2)
    left.set_xticks(list(workload.concurrency), [str(c) for c in workload.concurrency])
    left.set_xlabel("sequences in flight")
    left.set_ylabel("output tokens/s")
    left.set_title("Output throughput")
    left.legend()
    names = [r.system for r in ok]
    x = range(len(ok))
    right.bar([i - 0.2 for i in x], [r.decode_tok_s or 0 for r in ok], width=0.4, label="decode tok/s")
    right.bar([i + 0.2 for i in x], [r.prefill_tok_s or 0 for r in ok], width=0.4, label="prefill tok/s")
    right.set_xticks(list(x), names, rotation=20)
    right.set_title("Single stream")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(
    results: list[SystemResult],
    roofs: MachineRoofs | None,
    model: Path,
    workload: Workload,
    args: argparse.Namespace,
) -> Path:
    for r in results:
        if not r.error:
            r.bytes_per_token = bytes_per_token(model, r.system, args.cumulo_dtype)
    if roofs:
        print(
            f"machine: {roofs.read_gb_s:.1f} GB/s read ({roofs.read_gb_s_1_thread:.1f} with 1 thread), "
            f"{roofs.matmul_gflop_s:.0f} GFLOP/s fp32 matmul, {roofs.threads} threads"
        )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(
            f"WARNING: load average {load:.1f} on {os.cpu_count()} cores: other processes share the CPU, "
            "so these numbers are noisy (torch's thread pool suffers most); rerun on an idle machine"
        )
    print(f"model: {model.name}; workload: {asdict(workload)}")
    print(render_table(results, workload, roofs))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "roofs": roofs and roofs.as_dict(),
        },
        "model": str(model),
        "threads": args.threads,
        "load_average_at_end": load,
        "workload": asdict(workload),
        "results": [asdict(r) for r in results],
    }
    json_path = RESULTS_DIR / f"engine-{stamp}.json"
    json_path.write_text(json.dumps(record, indent=2))
    png_path = json_path.with_suffix(".png")
    _plot(results, workload, png_path)
    print(f"wrote {json_path} and {png_path.name}")
    return json_path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
