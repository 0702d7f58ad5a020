"""Engine benchmark: Cumulo vs llama.cpp (llama-cpp-python, llama-server, llama-bench) vs HF transformers.

Same GGUF, same machine, one run. Each system runs in its own process (so its peak resident memory is its own)
and does the same fixed work: single-stream decode, prefill of one long prompt (TTFT), and output throughput
with 1/4/16/64 sequences in flight, all with ignore_eos. Prints absolute numbers and ratios against llama.cpp,
the fraction of the memory-bandwidth roofline each system's decode reaches, and writes JSON + a PNG plot to
bench/results/.

    python -m bench.engine                      # everything (builds the anchors first if needed)
    python -m bench.engine --quick --systems llama-cpp-python,hf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import Workload, log, model_path

SYSTEMS = ("cumulo", "llama-cpp-python", "llama-server", "llama-bench", "hf")


def worker_main(args: argparse.Namespace) -> None:
    """Inside the child: measure one in-process system and print its SystemResult."""
    from bench.engine import workers  # noqa: PLC0415 - keeps torch and llama_cpp out of the driver

    workload = Workload(
        **{k: tuple(v) if k == "concurrency" else v for k, v in json.loads(args.workload).items()}
    )
    workers.main(args.worker, Path(args.model), args.threads, workload, args.cumulo_dtype)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short lengths, concurrency 1 and 4 (a smoke run)"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list from {', '.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default=None, help="comma list, default 1,4,16,64 (quick: 1,4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="GGUF path (default: Cumulo's smollm2-135m)")
    parser.add_argument("--cumulo-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-roofs", action="store_true", help="skip the bandwidth/matmul measurement")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    from bench.engine import report  # noqa: PLC0415
    from bench.engine.systems import run_system  # noqa: PLC0415

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    default_conc = (1, 4) if args.quick else (1, 4, 16, 64)
    concurrency = tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else default_conc
    workload = Workload.quick(concurrency) if args.quick else Workload(concurrency=concurrency)
    model = model_path(args.model)
    log(f"model: {model}")

    roofs = None
    if not args.no_roofs:
        from bench.chips.bandwidth import measure  # noqa: PLC0415

        log("measuring memory bandwidth and matmul rate ...")
        roofs = measure(args.threads, repeats=3 if args.quick else 5)

    results = [run_system(system, args, model, workload) for system in systems]
    report.finish(results, roofs, model, workload, args)


if __name__ == "__main__":
    main()
