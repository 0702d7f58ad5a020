"""Served throughput of real replicas behind the pool: 1 vs 2 replicas on one-core nodes; one two-core engine.

A local Ray pool (a head with no CPUs; nodes r0 and r1 with `--num-cpus 1`, node big with 2), one replica of
the model per node (`RayReplica`, engine threads = its node's CPUs). Each setup gets the same closed-loop
load: `--clients` clients, each sending its next request (a distinct random prompt, so no prefix cache
helps, and `--tokens` greedy tokens) as soon as the last one ends; throughput is the output tokens delivered
within a `--seconds` window after `--warmup` seconds. Setups:
- 1 x 1-core: one replica on r0, the anchor of the gain;
- 2 x 1-core: the replicas on r0 and r1 behind one Pool (the gain; a 2-core host shows at most ~2x);
- 1 x 2-core: one replica with 2 threads on big (is one machine better split into two 1-core replicas?).
Idle replicas stay up between setups (an idle engine waits, it does not spin).

    python -m bench.pool real [--model smollm2-135m|tiny] [--clients 16] [--seconds 30] [--repeats 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import log
from bench.pool.common import LocalRay, load_average, print_table, served_model, write_report
from cumulo.cluster.pool import Member, Pool
from cumulo.cluster.replica import RayReplica
from cumulo.contracts import SamplingParams

CHIP = "cpu-avx2-2core"
NODES = {"r0": 1, "r1": 1, "big": 2}  # node -> CPUs (= engine threads of its replica)
SETUPS = {"1 x 1-core": ["r0"], "2 x 1-core": ["r0", "r1"], "1 x 2-core": ["big"]}


async def closed_loop(pool: Pool, args: argparse.Namespace, seed: int) -> dict:
    """`args.clients` clients back to back; counts the tokens that arrive inside the measured window."""
    rng = random.Random(seed)
    vocab = min(pool.tokenizer.vocab_size, 30000)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    start = time.monotonic()
    window = (start + args.warmup, start + args.warmup + args.seconds)
    counted = finished = 0
    ttfts: list[float] = []

    async def client() -> None:
        nonlocal counted, finished
        while time.monotonic() < window[1]:
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
            sent, first = time.monotonic(), None
            async for out in pool.generate(prompt, params):
                now = time.monotonic()
                first = first or now
                if window[0] <= now < window[1]:
                    counted += len(out.new_token_ids)
                    finished += out.finished
            if window[0] <= sent:
                ttfts.append((first or sent) - sent)

    await asyncio.gather(*(client() for _ in range(args.clients)))
    return {
        "output_tok_s": round(counted / args.seconds, 1),
        "requests_done": finished,
        "ttft_ms_mean": round(1000 * sum(ttfts) / len(ttfts), 1) if ttfts else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool real", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="catalog model, or 'tiny' for a random Llama")
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=30.0, help="the measured window")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the three setups this many times, in turn"
    )
    args = parser.parse_args(argv)
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cumulo-real-") as tmp:
        source = served_model(args.model, Path(tmp))
        log(f"serving {source}; load average {load_before}")
        ray = LocalRay.start()
        try:
            replicas = {}
            for node, cpus in NODES.items():
                node_id = ray.add_node(node, cpus, CHIP)
                replicas[node] = RayReplica.start(
                    source,
                    name=f"real#{node}",
                    node_id=node_id,
                    num_cpus=cpus,
                    threads=cpus,
                    kv_cache_gib=1.0,
                )
                log(f"replica on {node} ready ({cpus} thread(s))")
            for repeat in range(args.repeats):
                for setup, nodes in SETUPS.items():
                    first = replicas[nodes[0]]
                    pool = Pool(first.info, first.tokenizer, policy="round-robin")
                    for node in nodes:
                        pool.add(Member(f"real#{node}", node, replicas[node]))
                    row = {"setup": setup, "repeat": repeat, "load": load_average().split()[0]}
                    row.update(asyncio.run(closed_loop(pool, args, seed=repeat)))
                    rows.append(row)
                    log(f"{row}")
            for replica in replicas.values():
                replica.shutdown()
        finally:
            ray.stop()
    report(source, args, rows, load_before)
    return 0


def report(source: str, args: argparse.Namespace, rows: list[dict], load_before: str) -> None:
    def best(setup: str) -> float:
        return max(r["output_tok_s"] for r in rows if r["setup"] == setup)

    def median(setup: str) -> float:
        return statistics.median(r["output_tok_s"] for r in rows if r["setup"] == setup)

    one, two, big = median("1 x 1-core"), median("2 x 1-core"), median("1 x 2-core")
    ratios = {
        "2 x 1-core / 1 x 1-core": round(two / one, 2),
        "2 x 1-core / 1 x 2-core": round(two / big, 2),
        "1 x 2-core / 1 x 1-core": round(big / one, 2),
    }
    print(
        f"\nmodel {source}; {args.clients} closed-loop clients, prompts of {args.prompt_tokens} random "
        f"tokens, {args.tokens} greedy tokens each; {args.seconds:.0f} s window after {args.warmup:.0f} s"
    )
    print(f"load average before {load_before}, after {load_average()} (load: 1-min, at start)\n")
    print_table(rows, ["setup", "repeat", "load", "output_tok_s", "requests_done", "ttft_ms_mean"])
    print("\nratios of median tok/s (best of repeats: "
          f"{best('1 x 1-core')}, {best('2 x 1-core')}, {best('1 x 2-core')} tok/s)")  # fmt: skip
    for name, ratio in ratios.items():
        print(f"  {name:26s} {ratio}x")
    write_report("real", {"model": source, "args": vars(args), "load_before": load_before,
                          "load_after": load_average(), "rows": rows, "ratios": ratios})  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
