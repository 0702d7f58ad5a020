"""The Ray side of tests/cluster/test_netns.py, run inside host a's network namespace in a process of its own
(a process joins one Ray cluster only, and the test process may already be in the shared local pool).

It starts the pool as `cumulo serve --cluster --ray-host A` does (`Head` with one CPU, named a), has host b join
with `cumulo join A:PORT --name b`, lets a `Controller` place two replicas of the model (one per host), streams
greedy completions through the replica on b, then cuts the link under a stream on b and times what follows.
Prints one JSON object on its last line of stdout.

    python -m tests.support.netns_driver CONFIG_JSON
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from cumulo.cluster.controller import Controller, Wanted, live_nodes
from cumulo.cluster.ray_cluster import Head, connect
from cumulo.contracts import SamplingParams

MODEL = "tiny-llama"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


async def stream(client, prompt: list[int], params: SamplingParams, on_delta=None) -> tuple[list[int], str]:
    tokens: list[int] = []
    reason = ""
    async for out in client.generate(prompt, params):
        tokens += out.new_token_ids
        reason = out.finish_reason or reason
        if on_delta is not None:
            on_delta(tokens)
    return tokens, reason


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def run(config: dict[str, Any]) -> dict[str, Any]:
    import ray

    join: subprocess.Popen | None = None
    started = time.monotonic()
    phases: dict[str, float] = {}
    head = Head(port=config["port"], host=config["host"], name="a", num_cpus=1)
    try:
        with open(config["join_log"], "ab") as log:
            join = subprocess.Popen(config["join"], stdout=log, stderr=log, start_new_session=True)
        connect(head.address)
        wait_until(lambda: {n.name for n in live_nodes()} >= {"a", "b"}, 120, "host b to join")
        phases["b_joined"] = time.monotonic() - started
        addresses = {n["Labels"]["cumulo-name"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}

        engines: dict = {}
        wanted = [Wanted(MODEL, config["model"], 2, format="fp32")]
        controller = Controller(lambda: wanted, engines.update, period_s=0.5, retry_s=1.0)
        controller.start()
        ready = lambda: [r for r in controller.replicas(MODEL) if r["state"] == "ready"]  # noqa: E731
        wait_until(lambda: len(ready()) == 2, 300, "two replicas")
        phases["replicas_ready"] = time.monotonic() - started
        replicas = {r["node"]: r for r in ready()}
        slots = {s.replica.name: s for s in controller.slots[MODEL].values()}
        on_b = slots[replicas["b"]["replica"]].replica
        node_b = on_b.node_id
        pool = engines[MODEL]
        prompt = config["prompt"]

        short = SamplingParams(max_tokens=config["short_tokens"], temperature=0.0, ignore_eos=True)
        through_b, _ = asyncio.run(stream(on_b, prompt, short))

        # The stream under the cut starts on b (a drains meanwhile), then a is ready to take it over.
        long = SamplingParams(max_tokens=config["long_tokens"], temperature=0.0, ignore_eos=True)
        on_a_name = replicas["a"]["replica"]
        pool.set_state(on_a_name, "draining")
        cut: dict[str, Any] = {}
        dead: dict[str, float] = {}

        def watch_node() -> None:
            while node_alive(node_b):
                time.sleep(0.05)
            dead["at"] = time.monotonic()

        def on_delta(tokens: list[int]) -> None:
            now = time.monotonic()
            serving = sorted(m["node"] for m in pool.status() if m["in_flight"] > 0)
            if not cut:
                pool.set_state(on_a_name, "ready")
                cut["serving_before"] = serving
                cut["tokens_before"] = len(tokens)
                subprocess.run(config["cut"], check=True, timeout=30)
                cut["at"] = time.monotonic()
                threading.Thread(target=watch_node, daemon=True).start()
            elif "resumed" not in cut and serving != cut["serving_before"]:  # the first delta of another
                cut["resumed"] = now
                cut["serving_after"] = serving
                cut["tokens_at_resume"] = len(tokens)

        failed_over, reason = asyncio.run(stream(pool, prompt, long, on_delta))
        wait_until(lambda: "at" in dead, 120, "b to be declared dead")
        phases["failed_over"] = time.monotonic() - started
        result = {
            "phases_s": {k: round(v, 1) for k, v in phases.items()},
            "addresses": addresses,
            "alive_after_cut": sorted(n.name for n in live_nodes()),
            "formats": {node: r["format"] for node, r in replicas.items()},
            "through_b": through_b,
            "failed_over": failed_over,
            "finish_reason": reason,
            "serving_before_cut": cut["serving_before"],
            "tokens_before_cut": cut["tokens_before"],
            "serving_after_cut": cut.get("serving_after"),
            "tokens_at_resume": cut.get("tokens_at_resume"),
            "node_dead_after_s": round(dead["at"] - cut["at"], 3),
            "stream_resumed_after_s": round(cut["resumed"] - cut["at"], 3) if "resumed" in cut else None,
        }
        controller.stop(stop_replicas=True)
        ray.shutdown()
        return result
    finally:
        if join is not None:  # b is cut off (or never joined): it cannot leave cleanly, so it dies as a host
            with contextlib.suppress(ProcessLookupError):
                os.killpg(join.pid, signal.SIGKILL)
            join.wait(10)
        head.stop()


def main() -> None:
    config = json.loads(sys.argv[1])
    result = run(config)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
