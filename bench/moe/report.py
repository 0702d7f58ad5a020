"""Turns bench.moe's raw measurements into the roof fractions, ratios and memory ratios, and prints/saves them."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import RESULTS_DIR, log
from bench.moe.spec import DeepSeekSpec, MoeSpec, active_bytes

MIB = 1 << 20


def roofs(
    tensor_bytes: dict[str, int], spec: MoeSpec | DeepSeekSpec, bandwidth_gb_s: float, batches: list[int]
) -> dict:
    """Per batch: the bytes a step reads (by part) and the tok/s that bandwidth allows for them."""
    out = {}
    for b in batches:
        parts = active_bytes(
            tensor_bytes, num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab, tokens=b
        )
        out[str(b)] = {"active_bytes": parts, "roof_tok_s": b * bandwidth_gb_s * 1e9 / parts["total"]}
    return out


def memory(system: dict, baseline_mib: float) -> dict | None:
    """Resident memory beyond the runtime's own (a process with torch and the engine imported, no model),
    against packed weights + the KV cache pages the run touched (the cache is allocated untouched on CPUs):
    after decoding (`ratio`), after glibc returns freed heap (`trimmed_ratio`: what load transients leave
    only in the allocator's free lists), and at the peak (`peak_ratio`: the fp32 load before converting)."""
    if "tensor_bytes" not in system:
        return None
    need = (sum(system["tensor_bytes"].values()) + system["kv_touched_bytes"]) / MIB
    return {
        "weights_mib": sum(system["tensor_bytes"].values()) / MIB,
        "kv_touched_mib": system["kv_touched_bytes"] / MIB,
        "kv_allocated_mib": system["kv_allocated_bytes"] / MIB,
        "rss_beyond_runtime_mib": system["rss_after_decode_mib"] - baseline_mib,
        "ratio": (system["rss_after_decode_mib"] - baseline_mib) / need,
        "trimmed_ratio": (system["rss_after_trim_mib"] - baseline_mib) / need,
        "peak_ratio": (system["peak_rss_mib"] - baseline_mib) / need,
    }


def build(spec: MoeSpec | DeepSeekSpec, systems: dict[str, dict], llama_bytes: dict[str, int], bandwidth: float,
          batches: list[int], args: argparse.Namespace) -> dict:  # fmt: skip
    baseline = systems["baseline"].get("rss_mib", 0.0)
    cu, ll = systems["cumulo"], systems["llama.cpp"]
    rows = {}
    for name, system, tensor_bytes in (
        ("cumulo", cu, cu.get("tensor_bytes")),
        ("llama.cpp", ll, llama_bytes),
    ):
        if system.get("error") or not tensor_bytes:
            rows[name] = {"error": system.get("error", "no result")}
            continue
        r = roofs(tensor_bytes, spec, bandwidth, batches)
        for b, tok_s in system.get("decode_tok_s", {}).items():
            if tok_s is not None and b in r:
                r[b]["tok_s"] = tok_s
                r[b]["fraction_of_roof"] = tok_s / r[b]["roof_tok_s"]
        rows[name] = r
    ratio = {}
    for b in map(str, batches):
        c, lc = rows.get("cumulo", {}).get(b, {}), rows.get("llama.cpp", {}).get(b, {})
        if "tok_s" in c and "tok_s" in lc:
            ratio[b] = c["tok_s"] / lc["tok_s"]
    mem = {name: memory(s, baseline) for name, s in systems.items() if name.startswith("cumulo")}
    slim = {name: {k: v for k, v in s.items() if k != "tensor_bytes"} for name, s in systems.items()}
    return {"arch": spec.ARCH, "title": spec.TITLE, "spec": spec.as_dict(), "params": spec.params(), "bandwidth_gb_s": bandwidth, "threads": args.threads,
            "format": args.format, "decode": rows, "cumulo_over_llama": ratio, "memory": mem, "systems": slim}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"\nMoE decode, {result['arch']} ({result['params']['total'] / 1e9:.2f} B weights, {result['params']['active'] / 1e9:.3f} B "
          f"active/token), read bandwidth {result['bandwidth_gb_s']:.1f} GB/s, {result['threads']} threads, "
          f"load {result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}")  # fmt: skip
    print(
        f"{'system':<12}{'batch':>6}{'active MB/step':>16}{'roof tok/s':>12}{'tok/s':>9}{'of roof':>9}{'vs llama':>10}"
    )
    for name, rows in result["decode"].items():
        if "error" in rows:
            print(f"{name:<12} ERROR {rows['error'][:200]}")
            continue
        for b, r in rows.items():
            tok_s = r.get("tok_s")
            vs = result["cumulo_over_llama"].get(b) if name == "cumulo" else None
            print(f"{name:<12}{b:>6}{r['active_bytes']['total'] / 1e6:>16.1f}{r['roof_tok_s']:>12.1f}"
                  f"{tok_s or float('nan'):>9.1f}{r.get('fraction_of_roof', float('nan')):>9.0%}"
                  f"{'' if vs is None else f'{vs:.2f}x':>10}")  # fmt: skip
    print(f"llama.cpp: {result['systems']['llama.cpp'].get('notes', '')}; Cumulo: {result['format']}, "
          f"{result['systems']['cumulo'].get('dtype')} activations")  # fmt: skip
    print(
        f"\n{'memory':<28}{'weights MiB':>12}{'KV MiB':>8}{'RSS-runtime':>12}{'ratio':>7}{'trimmed':>9}{'peak':>7}"
    )
    for name, m in result["memory"].items():
        if m is None:
            print(f"{name:<28} ERROR {result['systems'][name].get('error', '')[:200]}")
            continue
        print(f"{name:<28}{m['weights_mib']:>12.1f}{m['kv_touched_mib']:>8.1f}{m['rss_beyond_runtime_mib']:>12.1f}"
              f"{m['ratio']:>7.2f}{m['trimmed_ratio']:>9.2f}{m['peak_ratio']:>7.2f}")  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, (name, rows) in enumerate(result["decode"].items()):
        if "error" in rows:
            continue
        batches = list(rows)
        xs = [j + (i - 0.5) * width for j in range(len(batches))]
        ax.bar(xs, [rows[b].get("tok_s", 0) for b in batches], width, label=f"{name} measured")
        ax.scatter(xs, [rows[b]["roof_tok_s"] for b in batches], marker="_", s=600, color="k", zorder=3,
                   label="bandwidth roof of its active bytes" if i == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{result['title']} random {result['params']['total'] / 1e9:.2f}B, {result['bandwidth_gb_s']:.0f} GB/s, "
                 f"{result['threads']} threads, load {result['load_before'][0]:.1f}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(result: dict, plot_path: Path) -> None:
    print_table(result)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"moe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, plot_path)
    print(json.dumps({k: result[k] for k in ("cumulo_over_llama", "memory", "bandwidth_gb_s", "command")}))
    log(f"wrote {out} and {plot_path}")
