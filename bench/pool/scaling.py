"""Served throughput with 1, 2 and 4 replicas behind the pool, under a load that saturates them all.

Every run gets the same requests (distinct prompts, so no prefix cache helps; prompt and output lengths drawn
between half and one and a half times the mean) from the same number of
concurrent clients (twice what four replicas batch at once), each client sending its next request when the
last one ends; throughput is output tokens / time from the first request to the last token.

Target (issue 12): 2 replicas >= 1.9x and 4 replicas >= 3.6x the throughput of one.
"""

from __future__ import annotations

import argparse
import asyncio
import random

from bench.common import log
from bench.pool.common import (
    Timed,
    add_engine_args,
    clock_scale,
    engine_options,
    print_table,
    random_tokens,
    run,
    sim_pool,
    timed_request,
    write_report,
)

COLUMNS = [
    "replicas",
    "requests",
    "clients",
    "output_tok_s",
    "ttft_ms_mean",
    "elapsed_s",
    "per_replica_served",
]


def measure(
    replicas: int, requests: list[tuple[list[int], int]], clients: int, args: argparse.Namespace
) -> dict:
    pool = sim_pool(replicas, "prefix", **engine_options(args))
    scale = clock_scale(args)

    async def main() -> tuple[list[Timed], float]:
        loop = asyncio.get_running_loop()
        queue = list(reversed(requests))
        results: list[Timed] = []

        async def client() -> None:
            while queue:
                results.append(await timed_request(pool, *queue.pop(), scale=scale))

        start = loop.time()
        await asyncio.gather(*(client() for _ in range(clients)))
        return results, (loop.time() - start) / scale

    try:
        results, elapsed = run(main, args.wall_clock)
    finally:
        pool.shutdown()
    return {
        "replicas": replicas,
        "requests": len(results),
        "clients": clients,
        "output_tok_s": round(sum(r.output_tokens for r in results) / elapsed, 1),
        "ttft_ms_mean": round(sum(r.ttft_s for r in results) / len(results) * 1e3, 1),
        "elapsed_s": round(elapsed, 2),
        "per_replica_served": "/".join(str(s["served"]) for s in pool.status()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool scaling", description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--replicas", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--input-len", type=int, default=512, help="mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="mean output tokens")
    parser.add_argument("--requests", type=int, default=2048)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    # Lengths vary (half to one and a half times the mean), so replicas finish unevenly as they would.
    requests = [
        (random_tokens(rng, rng.randint(args.input_len // 2, args.input_len * 3 // 2)),
         rng.randint(args.output_len // 2, args.output_len * 3 // 2))
        for _ in range(args.requests)
    ]  # fmt: skip
    clients = 2 * args.max_batch * max(args.replicas)
    rows = []
    for n in args.replicas:
        log(f"{n} replica(s): {len(requests)} requests from {clients} clients ...")
        rows.append(measure(n, requests, clients, args))
    print_table(rows, COLUMNS)
    base = rows[0]["output_tok_s"]
    ratios = {str(r["replicas"]): round(r["output_tok_s"] / base, 3) for r in rows}
    print(
        ", ".join(f"{n} replicas / {rows[0]['replicas']} = {ratio:.2f}x" for n, ratio in ratios.items())
        + " (targets: 2 -> >= 1.9x, 4 -> >= 3.6x)"
    )
    write_report("scaling", {"args": vars(args), "rows": rows, "ratios": ratios})
    return 0
