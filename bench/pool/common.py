"""What the pool benches share: a virtual clock, pools of simulated replicas, timed requests, a table.

The replicas are `SimulatedEngine`s whose steps take the chips model's predicted times. By default the benches
run them on a virtual clock (an event loop whose time jumps to the next timer when nothing is ready), so a
minute of simulated serving takes seconds and the figures do not depend on how busy this host is; the pool's
own Python costs no simulated time there. `--wall-clock` runs the same on the real clock instead (with
`--time-scale` to run faster than the chip would; arrivals are scaled alike and every figure is reported in
the chip's seconds), where the pool's overhead does count.
"""

from __future__ import annotations

import asyncio
import json
import random
import selectors
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.common import RESULTS_DIR, log
from cumulo.cluster.pool import Member, Pool
from cumulo.cluster.sim_engine import SPECIAL, SimTokenizer, SimulatedEngine
from cumulo.contracts import SamplingParams

T = TypeVar("T")


class _VirtualSelector(selectors.DefaultSelector):
    """Never waits: with nothing ready, it moves the loop's clock to the next timer instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list:
        events = super().select(0)
        if not events and timeout is not None and timeout > 0:
            self.now += timeout
        elif not events and timeout is None:
            events = super().select(None)  # nothing scheduled at all: only a thread can wake us
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run(main: Callable[[], Awaitable[T]], wall_clock: bool) -> T:
    """Runs `main()` on a virtual clock, or on the real one."""
    with asyncio.Runner(loop_factory=None if wall_clock else VirtualClockLoop) as runner:
        return runner.run(main())  # type: ignore[arg-type]


def sim_pool(replicas: int, policy: str, **engine: Any) -> Pool:
    """`replicas` simulated engines of one model behind a pool, one per (pretend) node."""
    members = [Member(f"sim/{i}", f"node-{i}", SimulatedEngine(seed=i, **engine)) for i in range(replicas)]
    pool = Pool(members[0].client.info, SimTokenizer(), policy=policy)
    for member in members:
        pool.add(member)
    return pool


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [SPECIAL + rng.randrange(SimTokenizer.vocab_size - SPECIAL) for _ in range(n)]


@dataclass(slots=True)
class Timed:
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int


async def timed_request(
    pool: Pool, prompt: list[int], output_len: int, start_at: float = 0.0, scale: float = 1.0
) -> Timed:
    """Waits until `start_at` (loop time), sends the request, times its first token and its end (in the
    chip's seconds: loop seconds / `scale`)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    sent = loop.time()
    first: float | None = None
    tokens = cached = 0
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    async for out in pool.generate(prompt, params):
        if first is None:
            first, cached = loop.time(), out.num_cached_tokens
        tokens += len(out.new_token_ids)
    end = loop.time()
    return Timed(((first or end) - sent) / scale, (end - sent) / scale, len(prompt), tokens, cached)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(columns, widths, strict=True)))


def write_report(name: str, report: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"pool-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    log(f"wrote {out}")


def add_engine_args(parser: Any) -> None:
    parser.add_argument("--model", default="llama-3.1-8b", help="a chips-model preset (default llama-3.1-8b)")
    parser.add_argument("--chip", default="rtx-4090", help="a catalog chip (default rtx-4090)")
    parser.add_argument("--format", default="bf16", help="weight format (default bf16)")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences a replica runs at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wall-clock", action="store_true", help="run on the real clock, not a virtual one")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="with --wall-clock: sleep this share of each step"
    )


def clock_scale(args: Any) -> float:
    """Loop seconds per second of the simulated chip: arrival times are multiplied by it, durations divided."""
    return args.time_scale if args.wall_clock else 1.0


def engine_options(args: Any) -> dict[str, Any]:
    return {
        "model": args.model,
        "chip": args.chip,
        "format": args.format,
        "max_batch": args.max_batch,
        "time_scale": clock_scale(args),
    }
