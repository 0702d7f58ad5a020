"""Fail-over on a real local Ray pool: SIGKILL a node hosting in-flight streams; what do the clients get?

A head with no CPUs and `--nodes` worker nodes of one CPU each (separate `ray start --block` sessions, with
the tight health checks of `cumulo serve --cluster`); a `Controller` keeps 2 replicas of the model behind one
`Pool`. Each round sends `--streams` greedy streams at once, first undisturbed (the reference), then again,
killing the node of the busiest replica once every stream has `--kill-after` tokens. Reported per round and as
median [min, max]:
- detection: kill -> the first EngineUnavailable the pool sees, and -> the controller marking it lost;
- streams completed (of those in flight on the killed node, of all); streams whose tokens equal the reference;
- a migrated stream's longest silence between deltas (the fail-over gap) against the same stream's longest
  undisturbed, how long after the pool saw the loss it resumed, and its total time against undisturbed;
- kill -> the lost replica placed again (on a free node) and ready in the pool.
The anchor, in the same run: one `RayReplica` used straight, no pool, its node killed the same way.

    python -m bench.pool failover [--model smollm2-135m|tiny] [--rounds 3] [--streams 6] [--tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import log
from bench.pool.common import (
    LocalRay,
    Stream,
    load_average,
    print_table,
    record_stream,
    served_model,
    spread,
    write_report,
)
from cumulo.cluster.controller import Controller, Wanted
from cumulo.cluster.pool import Pool
from cumulo.cluster.replica import RayReplica
from cumulo.contracts import EngineClient, SamplingParams

MODEL = "served"
CHIP = "cpu-avx2-2core"
BARE_CHIP = "cpu-avx512-32core"  # the anchor's node claims another chip, so the controller never places there


def prompts_for(client: EngineClient, n: int, words: int = 16) -> list[list[int]]:
    """`n` distinct prompts (words t0..t249, which both the tiny word tokenizer and a real one encode)."""
    return [
        client.tokenizer.encode(" ".join(f"t{(7 * i + 3 * j) % 250}" for j in range(words))) for i in range(n)
    ]


async def streams_with_kill(
    client: EngineClient, prompts: list[list[int]], params: SamplingParams, tag: str, kill_after: int | None,
    choose_victim=None,
) -> tuple[list[Stream], dict]:  # fmt: skip
    """Runs every prompt at once; with `kill_after`, once every stream has that many tokens, SIGKILLs the node
    that `choose_victim()` returns (with what to remember of it)."""
    streams = [Stream() for _ in prompts]
    tasks = [
        asyncio.create_task(record_stream(client, p, params, f"{tag}-{i}", s))
        for i, (p, s) in enumerate(zip(prompts, streams, strict=True))
    ]
    kill: dict = {}
    if kill_after is not None:
        while not all(len(s.tokens) >= kill_after for s in streams) and not all(t.done() for t in tasks):
            await asyncio.sleep(0.005)
        node, kill = choose_victim()
        kill["at"] = time.time()
        await asyncio.to_thread(node.kill)
    await asyncio.gather(*tasks)
    return streams, kill


def bare_round(ray: LocalRay, source: str, args: argparse.Namespace, r: int) -> dict:
    node_id = ray.add_node("bare", 1, BARE_CHIP)
    replica = RayReplica.start(
        source, name=f"bare#{r}", node_id=node_id, num_cpus=1, threads=1, kv_cache_gib=0.5
    )
    prompts = prompts_for(replica, args.streams)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    streams, kill = asyncio.run(
        streams_with_kill(
            replica, prompts, params, f"bare{r}", args.kill_after, lambda: (ray.nodes["bare"], {})
        )
    )
    cut = [s for s in streams if s.error]
    return {
        "round": r,
        "streams": len(streams),
        "cut": len(cut),
        "completed": sum(s.finish_reason == "length" for s in streams),
        "detect_s": round(min(s.ended_at for s in cut) - kill["at"], 3) if cut else None,
    }


class ReplicaWatch:
    """Polls the controller's view of the replicas every 20 ms and keeps each state change with its time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.seen: list[tuple[float, str, str, str, float]] = []  # (polled at, replica, state, node, since)
        self._last: dict[str, tuple] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(0.02)

    def poll(self) -> None:
        for r in self.controller.replicas(MODEL):
            key = (r["state"], r["node"], r["since"])
            if self._last.get(r["replica"]) != key:
                self._last[r["replica"]] = key
                self.seen.append((time.time(), r["replica"], *key))

    def stop(self) -> list[tuple[float, str, str, str, float]]:
        self._stop.set()
        self._thread.join()
        self.poll()  # the state that ended the wait
        return self.seen


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def ready_nodes(controller: Controller) -> list[str]:
    return [r["node"] for r in controller.replicas(MODEL) if r["state"] == "ready"]


def pool_round(
    ray: LocalRay, controller: Controller, pool: Pool, lost_seen: list, args, r: int
) -> tuple[dict, dict]:
    wait_until(lambda: len(ready_nodes(controller)) == 2, 600, "two ready replicas")
    prompts = prompts_for(pool, args.streams)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    reference, _ = asyncio.run(streams_with_kill(pool, prompts, params, f"ref{r}", None))

    def choose_victim():
        busiest = max(pool.status(), key=lambda m: m["in_flight"])
        serving = dict(pool._serving)  # request id -> member now (a bench may look inside)
        victims = sorted(
            int(rid.rpartition("-")[2]) for rid, name in serving.items() if name == busiest["name"]
        )
        return ray.nodes[busiest["node"]], {
            "replica": busiest["name"],
            "node": busiest["node"],
            "victims": victims,
        }

    lost_seen.clear()
    watch = ReplicaWatch(controller)
    streams, kill = asyncio.run(
        streams_with_kill(pool, prompts, params, f"run{r}", args.kill_after, choose_victim)
    )
    killed, replica = kill["node"], kill["replica"]
    wait_until(
        lambda: len(ready_nodes(controller)) == 2 and killed not in ready_nodes(controller),
        600,
        "re-placement",
    )
    seen = watch.stop()
    ray.add_node(killed, 1, CHIP)  # the machine comes back for the next round

    mine = [s for s in seen if s[1] == replica and s[0] >= kill["at"]]
    # "unhealthy" is the pool's word (it saw a stream fail); "lost", then "starting", are the controller's
    lost_at = next((since for _, _, state, _, since in mine if state not in ("ready", "unhealthy")), None)
    placed_at = next(
        (t for t, _, state, node, _ in mine if state in ("starting", "ready") and node != killed), None
    )
    ready_at = next((since for _, _, state, node, since in mine if state == "ready" and node != killed), None)
    new_node = next((node for _, _, state, node, _ in mine if state == "ready" and node != killed), "")

    def longest_silence(s: Stream) -> float:
        return max(b[0] - a[0] for a, b in zip(s.arrivals, s.arrivals[1:], strict=False))

    def resumed(s: Stream) -> float:  # the first delta after the kill (from the member that took it over)
        return min(t for t, _ in s.arrivals if t > kill["at"])

    victims = [i for i in kill["victims"] if streams[i].finish_reason == "length"]
    detected = lost_seen[0] if lost_seen else None

    def median_over_victims(value) -> float | None:
        return round(statistics.median(value(i) for i in victims), 3) if victims else None

    timeline = {
        "kill": kill["at"], "detected": detected, "lost": lost_at, "ready": ready_at,
        "victims": kill["victims"], "streams": [s.arrivals for s in streams],
        "sent": [s.sent_at for s in streams],
        "reference": [s.arrivals for s in reference], "reference_sent": [s.sent_at for s in reference],
    }  # fmt: skip
    return timeline, {
        "round": r,
        "killed": killed,
        "in_flight_there": len(kill["victims"]),
        "completed_there": len(victims),
        "completed_all": sum(s.finish_reason == "length" for s in streams),
        "equal_tokens": sum(s.tokens == ref.tokens for s, ref in zip(streams, reference, strict=True)),
        "detect_pool_s": round(lost_seen[0] - kill["at"], 3) if lost_seen else None,
        "detect_controller_s": round(lost_at - kill["at"], 3) if lost_at else None,
        "gap_s": median_over_victims(lambda i: longest_silence(streams[i])),
        "usual_gap_s": median_over_victims(lambda i: longest_silence(reference[i])),
        "resume_after_detect_s": median_over_victims(lambda i: resumed(streams[i]) - detected)
        if detected
        else None,
        "migrated_extra_s": median_over_victims(lambda i: streams[i].elapsed_s - reference[i].elapsed_s),
        "migrated_time_ratio": median_over_victims(lambda i: streams[i].elapsed_s / reference[i].elapsed_s),
        "placed_again_s": round(placed_at - kill["at"], 3) if placed_at else None,
        "ready_again_s": round(ready_at - kill["at"], 3) if ready_at else None,
        "placed_on": new_node,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool failover", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="catalog model, or 'tiny' for a random Llama")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=6, help="concurrent greedy streams per round")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    parser.add_argument(
        "--kill-after", type=int, default=8, help="kill once every stream has this many tokens"
    )
    parser.add_argument("--nodes", type=int, default=3, help="worker nodes of 1 CPU (2 replicas, so >= 3)")
    parser.add_argument("--plot", help="write the last round's streams against time here (a .png)")
    args = parser.parse_args(argv)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="cumulo-failover-") as tmp:
        source = served_model(args.model, Path(tmp))
        log(f"serving {source}; load average {load_before}")
        ray = LocalRay.start()
        try:
            bare = []
            for r in range(args.rounds):
                bare.append(bare_round(ray, source, args, r))
                log(f"bare round {r}: {bare[-1]}")
            for i in range(args.nodes):
                ray.add_node(f"n{i}", 1, CHIP)
            engines: dict = {}
            controller = Controller(
                lambda: [Wanted(MODEL, source, 2, chip=CHIP)], engines.update, period_s=0.5, retry_s=1.0
            )
            controller.start()
            wait_until(lambda: MODEL in engines, 600, "the pool")
            pool: Pool = engines[MODEL]
            lost_seen: list[float] = []
            told = pool.on_member_lost

            def seen_lost(name: str) -> None:
                lost_seen.append(time.time())
                if told is not None:
                    told(name)

            pool.on_member_lost = seen_lost
            rounds = []
            for r in range(args.rounds):
                timeline, row = pool_round(ray, controller, pool, lost_seen, args, r)
                rounds.append(row)
                log(f"pool round {r}: {rounds[-1]}")
            controller.stop(stop_replicas=True)
        finally:
            ray.stop()
    report(source, args, bare, rounds, load_before)
    if args.plot:
        plot_timeline(Path(args.plot), timeline, source)
    return 0


def plot_timeline(path: Path, t: dict, source: str) -> None:
    """Tokens received by each stream of the last round against time from its start: undisturbed (grey),
    disturbed (blue), migrated (red); the kill, the pool seeing it and the replacement ready as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    start = min(t["sent"])
    ref_start = min(t["reference_sent"])
    for i, arrivals in enumerate(t["reference"]):
        ax.step(
            [a - ref_start for a, _ in arrivals],
            _cumulative(arrivals),
            where="post",
            color="0.7",
            lw=1,
            label="undisturbed" if i == 0 else None,
        )
    labelled: set[str] = set()
    for i, arrivals in enumerate(t["streams"]):
        kind = "migrated" if i in t["victims"] else "on the survivor"
        color = "tab:red" if kind == "migrated" else "tab:blue"
        label = None if kind in labelled else kind
        ax.step(
            [a - start for a, _ in arrivals],
            _cumulative(arrivals),
            where="post",
            lw=1.3,
            color=color,
            label=label,
        )
        labelled.add(kind)
    for key, style, label in (("kill", "k-", "node SIGKILLed"), ("detected", "k--", "pool sees it"),
                              ("ready", "k:", "replacement ready")):  # fmt: skip
        if t[key] is not None:
            ax.axvline(t[key] - start, linestyle=style[1:], color="k", lw=0.8, label=label)
    ax.set_xlabel("seconds since the streams were sent")
    ax.set_ylabel("tokens received")
    ax.set_title(f"A node killed under load: {len(t['streams'])} greedy streams, {source}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def _cumulative(arrivals: list[tuple[float, int]]) -> list[int]:
    total, out = 0, []
    for _, n in arrivals:
        total += n
        out.append(total)
    return out


BARE_COLUMNS = ["round", "streams", "cut", "completed", "detect_s"]
POOL_COLUMNS = ["round", "killed", "in_flight_there", "completed_there", "completed_all", "equal_tokens"]
TIMES = ["detect_pool_s", "detect_controller_s", "gap_s", "usual_gap_s", "resume_after_detect_s",
         "migrated_extra_s", "migrated_time_ratio", "placed_again_s", "ready_again_s"]  # fmt: skip


def report(
    source: str, args: argparse.Namespace, bare: list[dict], rounds: list[dict], load_before: str
) -> None:
    print(f"\nmodel {source}; {args.streams} streams of {args.tokens} greedy tokens; node SIGKILLed after "
          f"{args.kill_after}; load average before {load_before}, after {load_average()}\n")  # fmt: skip
    print("anchor: one RayReplica, no pool")
    print_table(bare, BARE_COLUMNS)
    print("\npool: 2 replicas on one-CPU nodes, the controller placing them again")
    print_table(rounds, [*POOL_COLUMNS, *TIMES[:5], "placed_on"])
    print()
    print_table(rounds, ["round", *TIMES[5:]])

    def col(rows: list[dict], key: str) -> list[float]:
        return [row[key] for row in rows if row[key] is not None]

    completed, in_flight = (
        sum(r["completed_there"] for r in rounds),
        sum(r["in_flight_there"] for r in rounds),
    )
    summary = {
        "bare_streams_cut": f"{sum(b['cut'] for b in bare)}/{sum(b['streams'] for b in bare)}",
        "bare_detect_s": spread(col(bare, "detect_s")),
        "pool_in_flight_completed": f"{completed}/{in_flight}",
        "pool_streams_equal_tokens": f"{sum(r['equal_tokens'] for r in rounds)}/{args.streams * len(rounds)}",
        **{key: spread(col(rounds, key)) for key in TIMES},
    }
    print("\nmedian [min, max] over rounds")
    for key, value in summary.items():
        print(f"  {key:28s} {value}")
    write_report("failover", {
        "model": source, "args": vars(args), "load_before": load_before, "load_after": load_average(),
        "bare": bare, "rounds": rounds, "summary": summary,
    })  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
