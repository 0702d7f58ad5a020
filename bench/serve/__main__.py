"""Serving benchmark: Cumulo's gateway + engine against the llama.cpp server, and the gateway's own latency.

In the style of `vllm bench serve`: TTFT, TPOT, ITL and output tokens/s at several concurrencies, for both
servers on the same GGUF in the same run, plus the gateway's own added latency (p50/p99).

    python -m bench.serve                              # 1, 4, 16 concurrent streams; anchor if built
    python -m bench.serve --concurrency 1,16 --output-len 64 --build-anchor
    python -m bench.serve --overhead-only

Targets (issue 4): gateway overhead p50 under 2 ms; output tok/s at 16 streams >= 1.0x the llama.cpp server.
Results: a table on stdout and JSON in bench/results/. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import REPO_DIR, RESULTS_DIR, log, model_path, prompt_token_ids, stop_process
from bench.serve.load import LevelResult, run_level
from bench.serve.overhead import gateway_overhead

COLUMNS = [
    "system",
    "concurrency",
    "requests",
    "output_tok_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "itl_ms_p50",
    "itl_ms_p99",
]


class CumuloServer:
    """`cumulo serve` on a free port with a throw-away data directory (the model store is shared, not copied)."""

    def __init__(self, model: Path, in_process: bool = False, format: str | None = None) -> None:
        from bench.anchors import free_port
        from cumulo.paths import models_dir

        self.data_dir = Path(tempfile.mkdtemp(prefix="cumulo-bench-serve-"))
        (self.data_dir / "models").symlink_to(models_dir())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = (
            [
                sys.executable,
                "-m",
                "cumulo.cli.main",
                "--data-dir",
                str(self.data_dir),
                "serve",
                "--port",
                str(self.port),
                "--model",
                str(model),
                "--log-level",
                "warning",
            ]
            + (["--engine-in-process"] if in_process else [])
            + (["--format", format] if format else [])
        )
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> CumuloServer:
        self._log = open(self.data_dir / "serve.log", "w")
        env = dict(os.environ, PYTHONPATH=str(REPO_DIR))
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"cumulo serve exited; see {self._log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        admin = {"Authorization": f"Bearer {(self.data_dir / 'admin_key').read_text().strip()}"}
        created = httpx.post(f"{self.url}/admin/keys", headers=admin, json={"org": "bench"}).json()
        self.headers = {"Authorization": f"Bearer {created['key']}"}
        self.model = httpx.get(f"{self.url}/v1/models", headers=self.headers).json()["data"][0]["id"]
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        self._log.close()


def _median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per (system, concurrency), the round whose output tok/s is the median of the rounds (the lower middle
    one for an even count)."""
    by_level: dict[tuple[str, int], list[dict]] = {}
    for rows in rounds:
        for row in rows:
            by_level.setdefault((row["system"], row["concurrency"]), []).append(row)
    picked = []
    for runs in by_level.values():
        ordered = sorted(runs, key=lambda row: row["output_tok_s"])
        picked.append(
            {**ordered[(len(ordered) - 1) // 2], "rounds_output_tok_s": [r["output_tok_s"] for r in runs]}
        )
    return picked


def _levels(
    system: str, url: str, headers: dict[str, str], model: str, args: argparse.Namespace
) -> list[LevelResult]:
    results = []
    for concurrency in args.concurrency:
        count = max(args.min_requests, 2 * concurrency)
        prompts = [prompt_token_ids(args.input_len, seed=i) for i in range(count)]
        # One short warm-up request per level: first-touch costs are not serving speed.
        asyncio.run(run_level(system, url, headers, model, prompts[:1], 4, 1))
        log(f"{system}: {count} requests at concurrency {concurrency} ...")
        results.append(
            asyncio.run(run_level(system, url, headers, model, prompts, args.output_len, concurrency))
        )
    return results


def _anchor(args: argparse.Namespace, model: Path) -> list[LevelResult]:
    from bench import anchors

    try:
        found = anchors.ensure_anchors() if args.build_anchor else anchors.locate()
    except SystemExit as exc:
        log(
            f"llama.cpp server anchor not available ({exc}); build it with `python -m bench.anchors` "
            "(about 15 minutes on 2 cores) or pass --build-anchor. Skipping the anchor."
        )
        return []
    ctx = args.input_len + args.output_len + 16
    with anchors.LlamaServer(
        found.server, model, parallel=max(args.concurrency), ctx_per_slot=ctx, threads=args.threads
    ) as server:
        return _levels("llama.cpp", server.url, {}, "anchor", args)


def _print_table(rows: list[dict]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS]
    print("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(COLUMNS, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__.splitlines()[0],
        epilog="Targets (issue 4): gateway overhead p50 under 2 ms; output tok/s at 16 streams >= 1.0x llama.cpp.",
    )
    parser.add_argument(
        "--concurrency",
        default="1,4,16",
        type=lambda s: [int(x) for x in s.split(",")],
        help="streams in flight, one level per value (default 1,4,16)",
    )
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument(
        "--min-requests", type=int, default=8, help="requests per level (at least 2x concurrency)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp server threads")
    parser.add_argument("--model", default=None, help="GGUF file (default: the catalog smollm2-135m)")
    parser.add_argument("--no-anchor", action="store_true", help="skip the llama.cpp server")
    parser.add_argument(
        "--format",
        default=None,
        help="serve Cumulo's engine in this compact number format (cumulo serve --format; default: the "
        "engine's dtype, bf16 or fp32 by CPU)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="also run `cumulo serve --engine-in-process` (the engine on a thread of the gateway's process)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="systems take turns this many times; the table shows each level's median round",
    )
    parser.add_argument("--build-anchor", action="store_true", help="build the llama.cpp server if missing")
    parser.add_argument("--overhead-only", action="store_true", help="only the gateway overhead")
    parser.add_argument(
        "--overhead-requests", type=int, default=300, help="timed requests of the gateway-overhead part"
    )
    args = parser.parse_args(argv)

    report: dict = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": vars(args).copy(),
        "load_average": os.getloadavg(),
    }
    log("gateway overhead (in-process, instant engine, SQLite) ...")
    report["overhead"] = gateway_overhead(args.overhead_requests)
    ovh = report["overhead"]
    print(
        f"gateway overhead: p50 {ovh['overhead_ms_p50']} ms, p99 {ovh['overhead_ms_p99']} ms, "
        f"CPU {ovh['overhead_cpu_ms_mean']} ms/request (target p50 < 2 ms; load average "
        f"{report['load_average'][0]:.1f})"
    )
    if not args.overhead_only:
        model = model_path(args.model)
        rounds: list[list[dict]] = []
        for r in range(args.rounds):  # systems take turns, so a host drifting over minutes is sampled by each
            if args.rounds > 1:
                log(f"round {r + 1} of {args.rounds}")
            with CumuloServer(model, format=args.format) as server:
                levels = _levels("cumulo", server.url, server.headers, server.model, args)
            if args.in_process:
                with CumuloServer(model, in_process=True, format=args.format) as server:
                    levels += _levels("cumulo-in-process", server.url, server.headers, server.model, args)
            if not args.no_anchor:
                levels += _anchor(args, model)
            rounds.append([level.summary() for level in levels])
        rows = _median_rows(rounds)
        report["levels"] = rows
        report["rounds"] = rounds
        _print_table(rows)
        by_system = {(r["system"], r["concurrency"]): r["output_tok_s"] for r in rows}
        for c in args.concurrency:
            if ("llama.cpp", c) in by_system and by_system[("llama.cpp", c)]:
                for system in ("cumulo", "cumulo-in-process"):
                    if (system, c) not in by_system:
                        continue
                    ratio = by_system[(system, c)] / by_system[("llama.cpp", c)]
                    report.setdefault(f"ratio_output_tok_s_{system}", {})[str(c)] = round(ratio, 3)
                    print(f"concurrency {c}: {system} / llama.cpp output tok/s = {ratio:.2f}x")
            for (
                rows
            ) in rounds:  # each round's own ratio, measured minutes apart, says how steady the host was
                mine = {(r["system"], r["concurrency"]): r["output_tok_s"] for r in rows}
                if mine.get(("llama.cpp", c)) and ("cumulo", c) in mine:
                    report.setdefault("round_ratios", {}).setdefault(str(c), []).append(
                        round(mine[("cumulo", c)] / mine[("llama.cpp", c)], 3)
                    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
