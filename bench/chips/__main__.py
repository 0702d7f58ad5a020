"""Check the chip performance model: against the brief's claims, and against the Cumulo engine on this machine.

    python -m bench.chips                # claims, then the engine across batch sizes and formats
    python -m bench.chips --claims-only  # no engine run
    python -m bench.chips --formats fp32,mxfp8,mxfp4 --batches 1,4,16 --prompt 64 --max-tokens 32

Part 1 prints the model's answer to each claim next to the claim, with the claim's provenance. Part 2 calibrates
this machine as the `local` chip (unless --no-calibrate and a calibration exists), runs SmolLM2-135M through the
engine and prints predicted against measured decode tokens/s and TTFT; the target is within +-25%. The cells,
probes and calibration also go to bench/results/perf-model-<time>.json.
The engine part is skipped, with the reason, when the engine or the model cannot be loaded. Never gates CI.
`python -m bench.chips.bandwidth` prints this machine's memory read bandwidth and matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.chips.claims import claims
from bench.chips.measure import ROUNDS, best_of_rounds, engine_dtype, load_engine, measure, probe_software
from bench.common import RESULTS_DIR
from cumulo.chips.catalog import load_catalog
from cumulo.chips.predict import Assumptions, Prediction, predict
from cumulo.engine.decode_graph import MAX_BATCH as DECODE_GRAPH_MAX_BATCH


def _ratio(pred: float, meas: float) -> str:
    return f"{pred / meas:5.2f}" if meas > 0 else "  n/a"


def engine_check(
    formats: list[str], batches: list[int], prompt_len: int, max_tokens: int, calibrate: bool, cpu_time: bool
) -> None:
    print("\nThe Cumulo engine on this machine: predicted (chip 'local') vs measured, SmolLM2-135M")
    clock, threads = (time.process_time, 1) if cpu_time else (time.perf_counter, None)
    if cpu_time:
        import torch

        torch.set_num_threads(1)
        print("  timing by process CPU time with one thread (--cpu-time): robust to other load on the host")
    try:
        from cumulo.engine.llm import LLM
        from cumulo.models import pull
    except ImportError as exc:
        print(f"  skipped: the engine is not available ({exc})")
        return
    from cumulo.chips.calibrate import calibrate as run_calibration
    from cumulo.chips.catalog import local_chip_path

    if calibrate or not local_chip_path().exists():
        print("  calibrating this machine (cumulo chips calibrate) ...")
        compact = tuple(f for f in formats if f not in ("fp32", "bf16"))
        run_calibration("cpu", clock=clock, formats=compact)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(
            f"  WARNING: load average {load:.1f} on {cores} cores: other processes share the CPU, so both the "
            "calibration and the measurements below are noisy; rerun on an idle machine"
        )
    local = load_catalog().get("local")
    print(
        f"  local: {local.memory_bandwidth_gbs:.1f} GB/s read, fp32 matmul {local.get('fp32_tflops') * 1e3:.0f} "
        f"GFLOP/s, op latency {local.get('op_latency_us'):.1f} us (in a decode graph "
        f"{local.get('graph_op_latency_us') or 0:.2f} us)"
    )
    try:
        pull.ensure("smollm2-135m", progress=False)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch the model only skips this part
        print(f"  skipped: cannot fetch smollm2-135m ({exc})")
        return
    print(
        f"  {'format':<10} {'batch':>5} {'hw only':>8} {'pred dec':>8} {'meas dec':>8} {'ratio':>5}   "
        f"{'pred TTFT':>9} {'meas TTFT':>9} {'ratio':>5}  bound"
    )
    record: dict = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "-m", "bench.chips", *sys.argv[1:]]),
        "local": {
            key: local.get(key)
            for key in (
                "memory_bandwidth_gbs",
                "fp32_tflops",
                "bf16_tflops",
                "op_latency_us",
                "graph_op_latency_us",
            )
        },
        "workload": {"prompt_tokens": prompt_len, "max_tokens": max_tokens, "rounds": ROUNDS},
        "probes": {},
        "cells": [],
    }
    for fmt in formats:
        llm = load_engine(LLM, fmt, threads)
        if llm is None:
            continue
        dtype = engine_dtype(llm)
        measure(llm, 1, 8, 3, clock)  # warm-up: first-call allocations and thread start-up

        budget = llm.engine.config.max_num_batched_tokens  # prefills run in steps of at most this many tokens

        def pred(
            batch: int, context: int, soft: Assumptions, fmt: str = fmt, dtype: str = dtype
        ) -> Prediction:
            return predict(
                "smollm2-135m",
                fmt,
                "local",
                batch=batch,
                context=context,
                emulation="dequant-per-step",
                compute_dtype=dtype,  # what the engine expands compact weights into
                assumptions=soft,
            )

        # Decode steps of up to MAX_BATCH sequences replay the engine's recorded graph where it has a recorder.
        graphs = DECODE_GRAPH_MAX_BATCH if llm.engine.runner.graph_recorder is not None else 0
        soft = probe_software(llm, pred, budget, max_tokens, clock, graphs)
        print(
            f"  {fmt + '/' + dtype:<10} probes: engine software {soft.step_overhead_s * 1e3:.1f} ms/step "
            f"+ {soft.seq_overhead_s * 1e3:.2f} ms/sequence (decode), "
            f"{soft.prefill_seq_overhead_s * 1e3:.1f} ms/prompt + {soft.prefill_token_overhead_s * 1e6:.0f} us/token "
            "(prefill), beyond the roofline"
        )
        hw_only = Assumptions(max_step_tokens=budget, graph_max_batch=graphs)
        record["probes"][f"{fmt}/{dtype}"] = {
            "step_overhead_s": soft.step_overhead_s,
            "seq_overhead_s": soft.seq_overhead_s,
            "prefill_seq_overhead_s": soft.prefill_seq_overhead_s,
            "prefill_token_overhead_s": soft.prefill_token_overhead_s,
        }
        cells = best_of_rounds(llm, [(b, prompt_len, max_tokens) for b in batches], clock)
        for b in batches:
            dec, ttft = cells[(b, prompt_len, max_tokens)]
            hw = pred(b, prompt_len + max_tokens // 2, hw_only)
            p = pred(b, prompt_len + max_tokens // 2, soft)
            pre = pred(b, prompt_len, soft)
            record["cells"].append({
                "format": fmt, "dtype": dtype, "batch": b, "hw_only_decode_tok_s": hw.decode_tok_s,
                "predicted_decode_tok_s": p.decode_tok_s, "measured_decode_tok_s": dec,
                "predicted_ttft_s": pre.ttft_s, "measured_ttft_s": ttft, "bound": p.bound,
            })  # fmt: skip
            print(
                f"  {fmt + '/' + dtype:<10} {b:>5} {hw.decode_tok_s:>8.1f} {p.decode_tok_s:>8.1f} {dec:>8.1f} "
                f"{_ratio(p.decode_tok_s, dec)}   {pre.ttft_s:>9.3f} {ttft:>9.3f} {_ratio(pre.ttft_s, ttft)}  "
                f"{p.bound}"
            )
        del llm
    checks = [
        (c[f"predicted_{q}"], c[f"measured_{q}"]) for c in record["cells"] for q in ("decode_tok_s", "ttft_s")
    ]
    if checks:
        within = sum(m > 0 and abs(p / m - 1) <= 0.25 for p, m in checks)
        print(
            f"  within +-25%: {within}/{len(checks)} cells (target: all); load average now {os.getloadavg()[0]:.1f}"
        )
        record.update(within=within, total=len(checks))
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"perf-model-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"  wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chips", description=__doc__.splitlines()[0])
    ap.add_argument("--claims-only", action="store_true")
    ap.add_argument("--formats", default="fp32,bf16,mxfp8,mxfp4", help="fp32/bf16 plain, or compact formats")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-calibrate", action="store_true", help="reuse an existing 'local' calibration")
    ap.add_argument(
        "--cpu-time", action="store_true", help="one thread, timed by process CPU time (for a busy host)"
    )
    args = ap.parse_args()
    claims()
    if not args.claims_only:
        engine_check(
            args.formats.split(","),
            [int(b) for b in args.batches.split(",")],
            args.prompt,
            args.max_tokens,
            not args.no_calibrate,
            args.cpu_time,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
