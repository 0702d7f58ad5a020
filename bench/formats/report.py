"""Table, target checks and plot of bench.formats' results (accuracy and speed of each number format)."""

from __future__ import annotations

from pathlib import Path

from bench.common import REPO_DIR

PLOT_PATH = REPO_DIR / "docs" / "img" / "formats-accuracy-speed.png"


def _by_format(rows: list[dict]) -> dict[str, dict]:
    return {r["format"]: r for r in rows}


def add_deltas(rows: list[dict]) -> None:
    """Perplexity delta (%) and decode speed-up against the fp32 row, in place."""
    base = _by_format(rows).get("float32", {})
    for r in rows:
        if base.get("perplexity") and r.get("perplexity"):
            r["ppl_delta_pct"] = (r["perplexity"] / base["perplexity"] - 1) * 100
        if base.get("decode_tok_s") and r.get("decode_tok_s"):
            r["speedup_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]


def targets(rows: list[dict], llama: dict | None) -> list[dict]:
    """Issue 3's targets: each with the measured value (None where a side is missing) and whether it is met."""
    add_deltas(rows)
    f = _by_format(rows)
    fp8, mxfp4, fp32, mxfp8 = (f.get(k, {}) for k in ("ue8m0-fp8", "mxfp4", "float32", "mxfp8"))
    llama_tok_s = (llama or {}).get("decode_tok_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    checks = [
        ("ue8m0-fp8 decode / Cumulo fp32 decode", ratio(fp8.get("decode_tok_s"), fp32.get("decode_tok_s")), ">=", 1.8),
        ("ue8m0-fp8 decode / llama.cpp Q4_1 decode", ratio(fp8.get("decode_tok_s"), llama_tok_s), ">=", 1.0),
        ("mxfp4 decode / llama.cpp Q4_1 decode", ratio(mxfp4.get("decode_tok_s"), llama_tok_s), ">=", 1.3),
        ("ue8m0-fp8 peak RSS / fp32 peak RSS", ratio(fp8.get("peak_rss_mib"), fp32.get("peak_rss_mib")), "<=", 0.4),
        ("ue8m0-fp8 perplexity delta %", fp8.get("ppl_delta_pct"), "<=", 1.0),
        ("mxfp8 perplexity delta %", mxfp8.get("ppl_delta_pct"), "<=", 1.0),
    ]  # fmt: skip
    out = []
    for name, value, op, bound in checks:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "value": value, "op": op, "bound": bound, "met": met})
    return out


def _fmt(value: float | None, spec: str) -> str:
    """format(value, spec), or a dash padded to the same width."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, spec)


def print_report(result: dict) -> None:
    m = result["machine"]
    roof = m["read_gb_s"]
    print(f"\n{result['model']}\nbaseline: {result['baseline']}")
    print(f"threads {m['threads']} of {m['cpus']} CPUs; read bandwidth {roof:.1f} GB/s; load average "
          f"{m['loadavg_before'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after; {result['seconds']:.0f} s")  # fmt: skip
    s = result["settings"]
    print(f"perplexity: {s['ppl_tokens']} tokens, context {s['context']}, stride {s['stride']}; decode: "
          f"32-token prompt, {s['tokens']} greedy tokens, best of {s['repeats']}\n")  # fmt: skip
    head = (f"{'format':<18} {'bits/w lin':>10} {'bits/w all':>10} {'size MB':>8} {'ppl':>8} {'delta %':>8} "
            f"{'tok/s':>7} {'x fp32':>6} {'peak MiB':>8} {'GB/s':>5} {'% roof':>6}")  # fmt: skip
    print(head)
    print("-" * len(head))
    rows = list(result["formats"]) + ([result["llama_cpp"]] if result.get("llama_cpp") else [])
    for r in rows:
        if r.get("error"):
            print(f"{r['label']:<18} ERROR {r['error'][:90]}")
            continue
        size = _fmt(r.get("checkpoint_bytes") and r["checkpoint_bytes"] / 1e6, "8.1f")
        size += "*" if r.get("checkpoint_computed") else " "
        gbps = r.get("weight_gb_s")
        reduced = r.get("decode_tokens", s["tokens"]) != s["tokens"]
        note = f"  (slow: {r['decode_tokens']} tokens, 1 run)" if reduced else ""
        note += "  (converted on load: its checkpoint did not load)" if r.get("served") else ""
        print(f"{r['label']:<18} {_fmt(r.get('linear_bits_per_weight'), '10.2f')} "
              f"{_fmt(r.get('checkpoint_bits_per_weight'), '10.2f')} {size:>8} {_fmt(r.get('perplexity'), '8.3f')} "
              f"{_fmt(r.get('ppl_delta_pct'), '+8.2f')} {_fmt(r.get('decode_tok_s'), '7.1f')} "
              f"{_fmt(r.get('speedup_vs_fp32'), '6.2f')} {_fmt(r.get('peak_rss_mib'), '8.0f')} "
              f"{_fmt(gbps, '5.1f')} {_fmt(gbps and gbps / roof * 100, '6.0f')}{note}")  # fmt: skip
    print(
        "* computed (4 or 2 bytes per weight); the GGUF itself is Q4_1. bits/w lin: the linear layers only "
        "(Q4_1: 5.0).\nGB/s: weight bytes read per token x tok/s (llama.cpp: the GGUF's size per token); "
        "% roof: of the read bandwidth."
    )
    rounds = result.get("speed_rounds") or []
    if rounds:
        fp32 = next((r["label"] for r in result["formats"] if r.get("format") == "float32"), None)
        llama = (result.get("llama_cpp") or {}).get("label")
        pairs = [(a, b) for a, b in (("ue8m0-fp8", fp32), ("ue8m0-fp8", llama), ("mxfp4", llama)) if b]
        print(
            f"\ndecode tok/s in {len(rounds)} more rounds, every system in turn (the table keeps each one's best):"
        )
        for i, rnd in enumerate(rounds, 1):
            ratios = "  ".join(
                f"{a}/{b.split()[0]} {_fmt(rnd.get(a) and rnd.get(b) and rnd[a] / rnd[b], '4.2f')}"
                for a, b in pairs
            )
            print(
                f"  round {i}: " + "  ".join(f"{k} {v:.1f}" for k, v in rnd.items()) + f"   ratios: {ratios}"
            )
    print("\ntargets (issue 3):")
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {t['target']:<44} {_fmt(t['value'], '7.2f')}  target {t['op']} {t['bound']}  {verdict}")


def _label_points(fig, ax, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    """Label each point on the first side (right/left, above/below) whose text box, estimated in pixels, meets
    no label placed before it: formats of similar speed and accuracy (ue8m0-fp8, fp8, hif8) sit side by side."""
    fig.canvas.draw()  # fixes the axis limits, so data map to pixels
    placed: list[tuple[float, float, float, float]] = []
    for r in sorted(rows, key=lambda r: r["decode_tok_s"]):
        px, py = ax.transData.transform((r["decode_tok_s"], r["ppl_delta_pct"]))
        w, h = 5.5 * len(r["label"]) * fig.dpi / 100, 10 * fig.dpi / 100
        for dx, dy, ha in (
            (5, 5, "left"),
            (5, -12, "left"),
            (-5, 5, "right"),
            (-5, -12, "right"),
            (5, 16, "left"),
        ):
            x0 = px + dx * fig.dpi / 72 - (w if ha == "right" else 0)
            y0 = py + dy * fig.dpi / 72
            box = (x0, y0, x0 + w, y0 + h)
            if not any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(r["label"], (r["decode_tok_s"], r["ppl_delta_pct"]), textcoords="offset points",
                    xytext=(dx, dy), ha=ha, fontsize=8)  # fmt: skip


def plot(result: dict, path: Path) -> None:
    """Perplexity delta (%) against decode tok/s, one labelled point per format; llama.cpp as a vertical line."""
    import matplotlib  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in result["formats"] if r.get("decode_tok_s") and r.get("ppl_delta_pct") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        ax.scatter(
            r["decode_tok_s"], r["ppl_delta_pct"], s=30, color="C3" if r["format"] == "float32" else "C0"
        )
    # Deltas span 0.1% (bf16) to tens of % (4-bit): linear below 1%, logarithmic above.
    ax.set_yscale("symlog", linthresh=1.0)
    low, high = ax.get_ylim()
    ax.set_yticks([t for t in (-2, -1, 0, 0.5, 1, 2, 5, 10, 20, 50, 100) if low <= t <= max(2.0, high)])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    _label_points(fig, ax, rows)
    llama = result.get("llama_cpp") or {}
    if llama.get("decode_tok_s"):
        ax.axvline(llama["decode_tok_s"], color="grey", linestyle="--", linewidth=1)
        ax.annotate("llama.cpp Q4_1", (llama["decode_tok_s"], ax.get_ylim()[1]), textcoords="offset points",
                    xytext=(-4, -12), ha="right", fontsize=8, color="grey")  # fmt: skip
    ax.axhline(1.0, color="C2", linestyle=":", linewidth=1, label="+1% (target for ue8m0-fp8 and mxfp8)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("single-stream decode, tok/s (higher is better)")
    ax.set_ylabel("perplexity delta vs fp32, % (lower is better)")
    m = result["machine"]
    ax.set_title(f"SmolLM2-135M, {m['threads']} threads, {result['date_utc']} UTC "
                 f"(load avg {m['loadavg_before'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after)", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The results table as Markdown, for docs/formats.md."""
    lines = [
        "| format | bits/weight (linears) | bits/weight (checkpoint) | size on disk | perplexity | delta vs fp32 "
        "| decode tok/s | x fp32 | peak RSS | weight GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(result["formats"]) + ([result["llama_cpp"]] if result.get("llama_cpp") else [])
    tokens = result["settings"]["tokens"]

    def short(r: dict) -> bool:
        return r.get("decode_tokens", tokens) != tokens

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | error: {r['error'][:80]} |||||||||")
            continue
        size = r.get("checkpoint_bytes")
        size_s = (
            "-"
            if size is None
            else f"{size / 1e6:.1f} MB" + (" (computed)" if r.get("checkpoint_computed") else "")
        )
        delta = r.get("ppl_delta_pct")
        cells = [
            r["label"] + (" (converted on load)" if r.get("served") else ""),
            _fmt(r.get("linear_bits_per_weight"), ".2f"),
            _fmt(r.get("checkpoint_bits_per_weight"), ".2f"),
            size_s,
            _fmt(r.get("perplexity"), ".3f"),
            "-" if delta is None else f"{delta:+.2f}%",
            _fmt(r.get("decode_tok_s"), ".1f")
            + (f" ({r['decode_tokens']} tokens, 1 run)" if short(r) else ""),
            _fmt(r.get("speedup_vs_fp32"), ".2f"),
            _fmt(r.get("peak_rss_mib"), ".0f") + " MiB",
            _fmt(r.get("weight_gb_s"), ".1f"),
        ]
        lines.append("| " + " | ".join(c.strip() for c in cells) + " |")
    return "\n".join(lines)
