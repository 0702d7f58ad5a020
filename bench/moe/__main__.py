"""MoE decode benchmark (issue 13): Cumulo vs the bandwidth roof of the active bytes and vs llama.cpp, same GGUF.

    python -m bench.moe            # the default model (bench/moe/spec.py says why that size)
    python -m bench.moe --quick    # a smaller model, fewer tokens: a smoke run

One run: (1) writes (once; cached under bench/.anchors/models/) a seeded random Qwen3-MoE as a Q8_0 GGUF with
SmolLM2's tokenizer; (2) measures this machine's read bandwidth (bench.chips.bandwidth); (3) in separate
processes: the runtime alone (torch + the engine, no model), Cumulo on the MoE (ue8m0-fp8, converted on load)
at batches 1/8/16, llama.cpp's server on the same file, and Cumulo on SmolLM2 (fp32 and ue8m0-fp8) for memory.
Prints a table, writes JSON to bench/results/ and a plot to docs/img/moe-decode.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench import anchors
from bench.common import ANCHORS_DIR, find_result, log, model_path, thread_env
from bench.moe.spec import ARCHES, DeepSeekSpec, MoeSpec

PROJECT_PYTHON = Path(sys.executable)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer tokens, one repeat")
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHES),
        default=MoeSpec.ARCH,
        help="the random model's architecture: Qwen3-MoE, or DeepSeek-V3 (MLA, grouped routing, a shared expert)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument(
        "--format", default="ue8m0-fp8", help="Cumulo's format for the MoE (converted on load)"
    )
    parser.add_argument("--dtype", default="auto", help="Cumulo's activation dtype")
    parser.add_argument("--no-dense", action="store_true", help="skip the SmolLM2 memory rows")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp (the roof rows still print)")
    parser.add_argument("--plot", help="where the figure goes (default docs/img/moe-decode[-deepseek2].png)")
    return parser.parse_args(argv)


def ensure_model(spec: MoeSpec | DeepSeekSpec) -> Path:
    from bench.moe.gguf_model import file_name, write_model_gguf  # noqa: PLC0415 - numpy + gguf

    path = ANCHORS_DIR / "models" / file_name(spec)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"writing {path.name} (seeded random weights) ...")
        write_model_gguf(spec, path, model_path())
    return path


def run_child(cmd: list[str], threads: int) -> dict:
    from bench.engine.systems import run_measured  # noqa: PLC0415

    code, out, err, peak = run_measured(cmd, thread_env(threads))
    payload = find_result(out)
    if payload is None:
        return {"error": f"exited {code}: {(out + err).strip()[-600:]}"}
    payload.setdefault("peak_rss_mib", peak)
    return payload


def cumulo(model: Path, fmt: str | None, args: argparse.Namespace, batches: str, tokens: int) -> dict:
    cmd = [str(PROJECT_PYTHON), "-m", "bench.moe.worker", "cumulo", "--model", str(model), "--dtype", args.dtype,
           "--threads", str(args.threads), "--batches", batches, "--tokens", str(tokens),
           "--repeats", "1" if args.quick else "3"]  # fmt: skip
    if fmt:
        cmd += ["--format", fmt]
    return run_child(cmd, args.threads)


def llama_server(model: Path, batches: list[int], tokens: int, repeats: int, threads: int) -> dict:
    """Decode tok/s per batch: B sequences of `tokens` minus B of one token, so prefill and HTTP cancel out."""
    from bench.common import prompt_token_ids  # noqa: PLC0415
    from bench.engine.systems import _concurrent  # noqa: PLC0415

    server_bin = anchors.locate().server
    out: dict = {"decode_tok_s": {}, "notes": "llama-server, --parallel = batch, --cont-batching"}
    peaks = []
    for b in batches:
        with anchors.LlamaServer(
            server_bin, model, parallel=b, ctx_per_slot=32 + tokens + 64, threads=threads
        ) as s:
            _concurrent(s.port, [prompt_token_ids(8, seed=999)], 4)  # warm-up
            best = 0.0
            for rep in range(repeats):
                full = _concurrent(
                    s.port, [prompt_token_ids(32, 100 * rep + 1000 * b + i) for i in range(b)], tokens
                )
                one = _concurrent(
                    s.port, [prompt_token_ids(32, 7 + 100 * rep + 1000 * b + i) for i in range(b)], 1
                )
                best = max(best, b * (tokens - 1) / (full - one))
            out["decode_tok_s"][str(b)] = best
            peaks.append(s.peak_rss_mib() or 0.0)
    out["peak_rss_mib"] = max(peaks)
    return out


def llama_binding(model: Path, tokens: int, repeats: int, threads: int) -> dict:
    """Fallback anchor while llama-server is not built: llama-cpp-python, one stream only."""
    cmd = [str(anchors.VENV_PYTHON), "-m", "bench.formats.worker", "llama", "--model", str(model),
           "--tokens", str(tokens), "--repeats", str(repeats), "--max-model-len", "256"]  # fmt: skip
    r = run_child(cmd, threads)
    return {"decode_tok_s": {"1": r.get("decode_tok_s")}, "peak_rss_mib": r.get("peak_rss_mib"),
            "error": r.get("error"), "notes": "llama-cpp-python (llama-server not built yet): batch 1 only"}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.moe import report  # noqa: PLC0415

    shape = ARCHES[args.arch]
    spec = shape.quick() if args.quick else shape()
    tokens, repeats = (16, 1) if args.quick else (64, 3)
    batches = [int(b) for b in args.batches.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()
    model = ensure_model(spec)
    log(f"model: {model} ({model.stat().st_size / 1e6:.0f} MB)")

    from bench.chips.bandwidth import read_bandwidth_gb_s  # noqa: PLC0415
    from bench.moe.gguf_model import gguf_tensor_bytes  # noqa: PLC0415

    log("measuring read bandwidth ...")
    bandwidth = read_bandwidth_gb_s(args.threads, repeats=3 if args.quick else 5)
    log(f"read bandwidth: {bandwidth:.1f} GB/s")

    systems: dict[str, dict] = {}
    log("[baseline] torch + engine, no model ...")
    systems["baseline"] = run_child(
        [str(PROJECT_PYTHON), "-m", "bench.moe.worker", "baseline", "--threads", str(args.threads)],
        args.threads,
    )
    log(f"[cumulo moe {args.format}] ...")
    systems["cumulo"] = cumulo(model, args.format, args, args.batches, tokens)
    if args.no_llama:
        systems["llama.cpp"] = {"error": "skipped (--no-llama)"}
    else:
        log("[llama.cpp] ...")
        try:
            systems["llama.cpp"] = llama_server(model, batches, tokens, repeats, args.threads)
        except SystemExit as exc:  # anchors.locate: not built
            log(f"llama-server unavailable ({exc}); falling back to llama-cpp-python")
            systems["llama.cpp"] = llama_binding(model, tokens, repeats, args.threads)
        except Exception as exc:  # noqa: BLE001 - a broken anchor is a row, not a crash
            systems["llama.cpp"] = {"error": f"{type(exc).__name__}: {exc}"}
    if not args.no_dense:
        smol = model_path()
        for fmt in (None, "ue8m0-fp8"):
            name = f"cumulo smollm2 {fmt or 'fp32'}"
            log(f"[{name}] ...")
            dense_args = argparse.Namespace(**{**vars(args), "dtype": "float32"})
            systems[name] = cumulo(smol, fmt, dense_args, "1", tokens)

    llama_bytes = gguf_tensor_bytes(model)
    result = report.build(spec, systems, llama_bytes, bandwidth, batches, args)
    result.update(started=started, load_before=load_before, load_after=os.getloadavg(), model=str(model),
                  command="python -m bench.moe " + " ".join(sys.argv[1:]))  # fmt: skip
    suffix = "" if spec.ARCH == MoeSpec.ARCH else f"-{spec.ARCH}"
    report.finish(result, Path(args.plot or f"docs/img/moe-decode{suffix}.png"))


if __name__ == "__main__":
    main()
