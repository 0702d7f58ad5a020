"""Accuracy and speed of every compact number format on SmolLM2-135M, against fp32 and llama.cpp in the same run.

    python -m bench.formats [--quick] [--threads 2] [--formats ue8m0-fp8,mxfp4] [--ppl-tokens 2048] [--no-llama]
    python -m bench.formats.kernels [...]   # the kernel micro-benchmark (also: python -m bench.formats --kernels)

The model is the catalog's SmolLM2-135M-Instruct GGUF (Q4_1); "unquantized" (fp32) means its weights
dequantized to fp32 on load, which is also what every format is converted from. For each format the run:
converts the model with `cumulo convert` into a temporary directory (size on disk = its safetensors files; fp32
and bf16 sizes are computed, 4 and 2 bytes per weight), then serves that packed checkpoint in a fresh process
(bench/formats/worker.py) that measures single-stream decode (32-token prompt, 64 greedy tokens, best of 3),
its own peak resident memory (VmHWM), and the perplexity of the served weights on the same text and windows as
the fp32 baseline. GB/s = weight bytes read per token (every weight once; the tied embedding is read whole by
lm_head) x decode tok/s, next to the machine's read bandwidth (bench/chips/bandwidth.py) measured in the same run.
If the llama.cpp anchor is built (bench/.anchors/venv, `python -m bench.anchors`), llama-cpp-python decodes
the Q4_1 GGUF with the same prompts and threads. Then --rounds more decode-only rounds (default 3) go over the
systems the speed targets compare (fp32, ue8m0-fp8, mxfp4 and llama.cpp) in turn, fresh processes each, so
that every system sees the same phases of a shared host's load; each system's decode figure is its best over
the first pass and the rounds, and the ratios of each round are printed too (their spread is the host's noise).
Prints a table and the issue's target ratios, writes JSON to bench/results/ and a plot of perplexity delta
against decode tok/s. Never gates CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO_DIR, RESULTS_DIR, find_result, log, model_path, thread_env
from bench.formats.report import PLOT_PATH, plot, print_report, targets

# (label, cumulo format or None, engine dtype): fp32 and bf16 serve the GGUF directly, the others a conversion,
# served in the activation dtype --compact-dtype names (COMPACT).
COMPACT = "compact"
FORMATS = [
    ("fp32", None, "float32"),
    ("bf16", None, "bfloat16"),
    ("ue8m0-fp8", "ue8m0-fp8", COMPACT),
    ("fp8 (per-channel)", "fp8", COMPACT),
    ("mxfp8", "mxfp8", COMPACT),
    ("mxfp6", "mxfp6", COMPACT),
    ("mxfp4", "mxfp4", COMPACT),
    ("mxint8", "mxint8", COMPACT),
    ("nvfp4", "nvfp4", COMPACT),
    ("hif8", "hif8", COMPACT),
]
DENSE_BITS = {"float32": 32, "bfloat16": 16}
SPEED_FORMATS = ("float32", "ue8m0-fp8", "mxfp4")  # the formats the speed targets compare (with llama.cpp)
WORKER_TIMEOUT_S = 900


def run_child(cmd: list[str], threads: int, timeout_s: float = WORKER_TIMEOUT_S) -> dict:
    """Run a worker in a fresh process; its last marked stdout line is the result."""
    try:
        done = subprocess.run(cmd, env=thread_env(threads), cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    result = find_result(done.stdout)
    return (
        result if result is not None else {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
    )


def convert(model: Path, fmt: str, out: Path, threads: int) -> dict:
    """`cumulo convert` into `out`; returns the seconds it took and the size of its safetensors files."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "cumulo.cli.main", "convert", str(model), "--format", fmt, "-o", str(out)]
    done = subprocess.run(cmd, env=thread_env(threads), cwd=REPO_DIR, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"convert failed: {done.stderr.strip()[-400:]}"}
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"convert_seconds": time.perf_counter() - start, "checkpoint_bytes": size}


def worker_args(args: argparse.Namespace) -> list[str]:
    return ["--threads", str(args.threads), "--prompt", "32", "--tokens", str(args.tokens),
            "--repeats", str(args.repeats), "--budget-s", str(args.decode_budget_s)]  # fmt: skip


def measure_format(
    label: str, fmt: str | None, dtype: str, gguf: Path, args: argparse.Namespace, work: Path
) -> tuple[dict, list[str] | None]:
    """The format's row, and the worker command that served it (for the speed rounds; None if it failed).
    Checkpoints are converted into `work`, which the caller removes."""
    if dtype == COMPACT:
        dtype = args.compact_dtype
    row: dict = {"label": label, "format": fmt or dtype, "dtype": dtype}
    ppl = ["--ppl-tokens", str(args.ppl_tokens), "--context", str(args.context), "--stride", str(args.stride)]
    tmp = tempfile.mkdtemp(prefix=f"{label.split()[0]}-", dir=work)
    served = gguf
    if fmt is not None:
        log(f"[{label}] converting ...")
        row.update(convert(gguf, fmt, Path(tmp) / fmt, args.threads))
        if "error" in row:
            return row, None
        served = Path(tmp) / fmt
    log(f"[{label}] serving {'the GGUF' if fmt is None else 'the packed checkpoint'} (dtype {dtype}) ...")
    cmd = [
        sys.executable,
        "-m",
        "bench.formats.worker",
        "cumulo",
        "--model",
        str(served),
        "--dtype",
        dtype,
    ]
    row.update(run_child(cmd + worker_args(args) + ppl, args.threads))
    serve = cmd
    if fmt is not None and "error" in row:
        # The checkpoint would not load (e.g. NVFP4 q/k/v parts with different tensor scales cannot be fused
        # exactly): measure the same format converted on load instead, and say so in the row.
        failed = row.pop("error")
        log(f"[{label}] the checkpoint failed ({failed}); serving the GGUF with --format {fmt} instead ...")
        cmd[cmd.index(str(served))] = str(gguf)
        serve = [*cmd, "--format", fmt]
        row.update(run_child([*serve, *worker_args(args), *ppl], args.threads))
        row["served"] = f"converted on load; the checkpoint failed to load: {failed}"
    if "weights" in row:
        if fmt is None:  # the GGUF is Q4_1 on disk; these are the sizes of an fp32 / bf16 safetensors file
            row["checkpoint_bytes"] = row["weights"] * DENSE_BITS[dtype] // 8
            row["checkpoint_computed"] = True
            row["linear_bits_per_weight"] = DENSE_BITS[dtype]
        else:
            row["linear_bits_per_weight"] = row["linear_bytes"] * 8 / row["linear_weights"]
        row["checkpoint_bits_per_weight"] = row["checkpoint_bytes"] * 8 / row["weights"]
    if "decode_tok_s" in row:
        row["weight_gb_s"] = row["bytes_per_token"] * row["decode_tok_s"] / 1e9
    log(f"[{label}] {row.get('error') or 'done'}")
    return row, (None if "error" in row else serve)


def llama_command(gguf: Path) -> list[str] | None:
    """The llama-cpp-python worker command, if the anchor venv has it; None when the anchor is not built."""
    from bench import anchors  # noqa: PLC0415

    python = anchors.VENV_PYTHON
    if (
        not python.exists()
        or subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode
    ):
        return None
    return [str(python), "-m", "bench.formats.worker", "llama", "--model", str(gguf)]


def speed_rounds(
    systems: dict[str, tuple[dict, list[str]]], args: argparse.Namespace
) -> list[dict[str, float]]:
    """args.rounds decode-only rounds over `systems` (label -> (row, worker command)), in turn within each round.
    Each row's decode_tok_s becomes its best over the first pass and the rounds; returns each round's tok/s."""
    rounds = []
    for r in range(args.rounds):
        log(f"[speed round {r + 1}/{args.rounds}] {', '.join(systems)} ...")
        measured = {}
        for label, (row, cmd) in systems.items():
            tok_s = run_child(cmd + worker_args(args), args.threads).get("decode_tok_s")
            if tok_s:
                measured[label] = tok_s
                row["decode_tok_s"] = max(row.get("decode_tok_s") or 0.0, tok_s)
        rounds.append(measured)
    for row, _ in systems.values():
        if row.get("decode_tok_s") and row.get("bytes_per_token"):
            row["weight_gb_s"] = row["bytes_per_token"] * row["decode_tok_s"] / 1e9
    return rounds


def measure_llama(gguf: Path, args: argparse.Namespace, weights: int | None) -> dict | None:
    """llama-cpp-python on the Q4_1 GGUF, if the anchor venv has it; None when the anchor is not built."""
    cmd = llama_command(gguf)
    if cmd is None:
        return None
    log("[llama.cpp] decoding the Q4_1 GGUF ...")
    row = run_child(cmd + worker_args(args), args.threads)
    row.update(label="llama.cpp Q4_1", format="gguf:Q4_1", dtype="Q4_1")
    row["checkpoint_bytes"] = gguf.stat().st_size
    row["linear_bits_per_weight"] = 5.0  # Q4_1: 32 four-bit codes + an fp16 scale and an fp16 minimum
    if weights:
        row["checkpoint_bits_per_weight"] = row["checkpoint_bytes"] * 8 / weights
    if row.get("decode_tok_s"):
        # Every tensor of the file is read once per token (the tied embedding whole, by the output layer); the
        # file's metadata (vocabulary) is a few MB of the total, so this slightly overstates the bytes.
        row["bytes_per_token"] = row["checkpoint_bytes"]
        row["weight_gb_s"] = row["bytes_per_token"] * row["decode_tok_s"] / 1e9
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--kernels" in argv:
        from bench.formats.kernels import main as kernels_main  # noqa: PLC0415

        return kernels_main([a for a in argv if a != "--kernels"])
    parser = argparse.ArgumentParser(
        prog="python -m bench.formats",
        description=__doc__.splitlines()[0],
        epilog="--kernels runs the kernel micro-benchmark instead (python -m bench.formats.kernels; its own --help).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer perplexity and decode tokens: a few minutes"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", help="comma-separated labels or format names (default: all)")
    parser.add_argument("--model", help="GGUF path (default: the catalog's smollm2-135m)")
    parser.add_argument("--ppl-tokens", type=int, help="corpus tokens scored (default 2048; quick 512)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--tokens", type=int, help="greedy tokens per decode run (default 64; quick 32)")
    parser.add_argument("--repeats", type=int, help="decode runs, best kept (default 3; quick 1)")
    parser.add_argument("--decode-budget-s", type=float, default=60.0,
                        help="formats predicted to decode slower than this get fewer tokens")  # fmt: skip
    parser.add_argument("--no-llama", action="store_true", help="skip the llama.cpp anchor")
    parser.add_argument(
        "--rounds",
        type=int,
        help="decode-only rounds over fp32, ue8m0-fp8, mxfp4 and llama.cpp "
        "after the first pass (default 3; quick 0)",
    )
    parser.add_argument("--compact-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="activation dtype the compact formats are served in (default bfloat16, the engine's "
                             "default on CPUs with native bf16; float32 for the exact-fp32 kernels)")  # fmt: skip
    parser.add_argument("--plot", type=Path, help=f"plot path (default {PLOT_PATH}; quick: bench/results/)")
    args = parser.parse_args(argv)
    args.ppl_tokens = args.ppl_tokens or (512 if args.quick else 2048)
    args.tokens = args.tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rounds = (0 if args.quick else 3) if args.rounds is None else args.rounds
    if args.quick:
        args.decode_budget_s = min(args.decode_budget_s, 20.0)
    chosen = FORMATS
    if args.formats:
        wanted = set(args.formats.split(","))
        chosen = [f for f in FORMATS if f[0] in wanted or f[1] in wanted or f[2] in wanted]
        if FORMATS[0] not in chosen:  # fp32 is the baseline of every delta
            chosen = [FORMATS[0], *chosen]

    from bench.chips.bandwidth import read_bandwidth_gb_s  # noqa: PLC0415

    started = time.time()
    load_before = os.getloadavg()
    gguf = model_path(args.model)
    log(f"model {gguf}; measuring read bandwidth with {args.threads} thread(s) ...")
    bandwidth = read_bandwidth_gb_s(args.threads, size_bytes=(256 if args.quick else 1024) << 20)
    with tempfile.TemporaryDirectory(prefix="cumulo-formats-") as work:
        measured = [measure_format(label, fmt, dtype, gguf, args, Path(work)) for label, fmt, dtype in chosen]
        rows = [row for row, _ in measured]
        llama = None if args.no_llama else measure_llama(gguf, args, rows[0].get("weights"))
        systems = {
            row["label"]: (row, cmd) for row, cmd in measured if cmd and row["format"] in SPEED_FORMATS
        }
        if llama and llama.get("decode_tok_s"):
            systems[llama["label"]] = (llama, llama_command(gguf) or [])
        rounds = speed_rounds(systems, args) if len(systems) > 1 else []
    result = {
        "model": str(gguf),
        "baseline": "fp32 = the GGUF's Q4_1 weights dequantized to fp32 (no 16-bit HF checkpoint offline)",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "read_gb_s": bandwidth,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },  # fmt: skip
        "settings": {k: v for k, v in vars(args).items() if k != "plot"},
        "command": "python -m bench.formats " + " ".join(argv),
        "seconds": time.time() - started,
        "formats": rows,
        "llama_cpp": llama,
        "speed_rounds": rounds,
    }
    result["targets"] = targets(rows, llama)
    print_report(result)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    json_path = RESULTS_DIR / f"formats-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png = args.plot or (RESULTS_DIR / f"formats-{stamp}.png" if args.quick else PLOT_PATH)
    plot(result, png)
    print(f"\nwrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
