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
import contextlib
import json
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.common import REPO_DIR, RESULTS_DIR, log
from cumulo.cluster.pool import Member, Pool
from cumulo.cluster.sim_engine import SPECIAL, SimTokenizer, SimulatedEngine
from cumulo.contracts import SamplingParams
from cumulo.errors import CumuloError, EngineUnavailable

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


# -- a real local Ray pool (the failover and real benches) ---------------------------------------------------
# Each node is a `ray start --block` process group of its own, so SIGKILL to the group is a machine that dies:
# its raylet, its workers and the replica on it go at once. (The same as tests/support/ray_pool.py, which
# benches may not import.)


HEAD_CHIP = "cpu-avx2-2core"


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL to the whole node at once: `ray start`, its raylet and every worker on it. Ray puts each
        worker in a process group of its own (a replica outlives a SIGKILL to the node's group by about a
        second, streaming on), but all stay in the node's session: `start_new_session` made it this pid's."""
        for _ in range(2):
            for pid in session_pids(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process.wait(10)


def session_pids(sid: int) -> list[int]:
    """Every process of session `sid` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()  # state ppid pgrp session ...
            if int(fields[3]) == sid:
                pids.append(int(stat.parent.name))
    return pids


@dataclass
class LocalRay:
    """A head with no CPUs (it runs no replica) and worker nodes added by name; this process is connected."""

    address: str
    head: RayNode
    nodes: dict[str, RayNode] = field(default_factory=dict)

    @classmethod
    def start(cls) -> LocalRay:
        from cumulo.cluster.ray_cluster import connect, wait_for_head

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"127.0.0.1:{port}"
        head = RayNode("head", _ray_start([
            "--head", f"--port={port}", "--include-dashboard=false", "--num-cpus=0",
            "--labels", json.dumps({"cumulo-name": "head", "cumulo-kind": "cpu", "cumulo-chip": HEAD_CHIP}),
        ]))  # fmt: skip
        wait_for_head(address, head.process)
        connect(address)
        return cls(address, head)

    def add_node(self, name: str, num_cpus: int, chip: str) -> str:
        """Starts node `name` (a `cumulo-chip` label and a `chip:<chip>` resource, as `cumulo join` gives) and
        returns its Ray node id once it is alive."""
        labels = {
            "cumulo-name": name,
            "cumulo-kind": "cpu",
            "cumulo-chip": chip,
            "cumulo-cores": str(num_cpus),
        }
        self.nodes[name] = RayNode(name, _ray_start([
            f"--address={self.address}", f"--num-cpus={num_cpus}",
            "--labels", json.dumps(labels), "--resources", json.dumps({f"chip:{chip}": 1}),
        ]))  # fmt: skip
        return self.node_id(name)

    def node_id(self, name: str, timeout: float = 120.0) -> str:
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in ray.nodes():
                if n["Alive"] and n["Labels"].get("cumulo-name") == name:
                    return n["NodeID"]
            time.sleep(0.2)
        raise RuntimeError(f"node {name} did not join the local Ray pool")

    def stop(self) -> None:
        import ray

        ray.shutdown()
        for node in [*self.nodes.values(), self.head]:
            node.kill()


def _ray_start(args: list[str]) -> subprocess.Popen:
    from cumulo.cluster.ray_cluster import HEALTH_CHECK_ENV, ray_executable

    env = {**os.environ, **HEALTH_CHECK_ENV, "PYTHONPATH": str(REPO_DIR), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [ray_executable(), "start", "--block", "--node-ip-address=127.0.0.1",
         "--object-store-memory=100000000", "--disable-usage-stats", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO_DIR,
    )  # fmt: skip


def served_model(name: str, directory: Path) -> str:
    """What a replica loads: catalog model `name` when it is pulled (or can be), else a tiny random Llama
    written to `directory` ("tiny" asks for it outright)."""
    if name != "tiny":
        from cumulo.models.pull import ensure

        try:
            ensure(name, progress=False)
            return name
        except CumuloError as exc:
            log(f"{name} is not available ({exc}); serving a tiny random Llama instead")
    return str(write_tiny_llama(directory / "tiny-llama"))


def write_tiny_llama(path: Path, vocab: int = 256, hidden: int = 64, intermediate: int = 128) -> Path:
    """A tiny Llama (transformers' init, seed 0) with a word tokenizer t0..tN, saved as safetensors."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


@dataclass(slots=True)
class Stream:
    """One streamed request as its client saw it: every delta's arrival (time.time()) and token count."""

    tokens: list[int] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""
    sent_at: float = 0.0
    ended_at: float = 0.0

    @property
    def elapsed_s(self) -> float:
        return (self.arrivals[-1][0] if self.arrivals else self.sent_at) - self.sent_at


async def record_stream(
    client: Any, prompt: list[int], params: SamplingParams, rid: str, into: Stream
) -> None:
    """Streams one request from `client` (any EngineClient) into `into`; EngineUnavailable ends it as cut."""
    into.sent_at = time.time()
    try:
        async for out in client.generate(prompt, params, rid):
            into.tokens += out.new_token_ids
            into.arrivals.append((time.time(), len(out.new_token_ids)))
            into.finish_reason = out.finish_reason
    except EngineUnavailable as exc:
        into.error = str(exc)
    finally:
        into.ended_at = time.time()


def spread(values: list[float], digits: int = 3) -> str:
    """median [min, max] of `values`."""
    if not values:
        return "-"
    median, low, high = (round(v, digits) for v in (statistics.median(values), min(values), max(values)))
    return f"{median} [{low}, {high}]"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
