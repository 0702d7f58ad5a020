"""The pool on a real local Ray cluster: nodes are separate `ray start` process groups, replicas are Ray actors
that load a tiny Llama from disk, and a node is killed with SIGKILL under load, as a machine that dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cumulo.cluster.controller import Controller, Wanted
from cumulo.cluster.pool import Pool
from cumulo.contracts import SamplingParams
from tests.support.ray_pool import node_with, shared_pool

CHIP = (
    "cpu-avx512-32core"  # these test nodes claim a chip of their own, so only this module's replicas go there
)
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, write_tiny_llama) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / MODEL, 256, 64, 128, weight_std=0.5)


class Served:
    """What the gateway would serve: the controller publishes its pools here."""

    engines: dict = {}

    def publish(self, engines: dict) -> None:
        self.engines = engines


def wait_until(condition, timeout: float = 180.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def ready(controller: Controller) -> list[dict]:
    return [r for r in controller.replicas(MODEL) if r["state"] == "ready"]


@pytest.fixture(scope="module")
def cluster(tiny_dir: Path) -> Iterator[tuple[Controller, Served]]:
    for name in ("a", "b", "c"):  # three machines for two replicas: a lost one has somewhere to go
        node_with(name, 2, CHIP)
    served = Served()
    wanted = [Wanted(MODEL, str(tiny_dir), 2, format="fp32", chip=CHIP)]  # fp32 on both sides of a comparison
    controller = Controller(lambda: wanted, served.publish, period_s=0.5, retry_s=1.0)
    controller.start()
    wait_until(lambda: len(ready(controller)) == 2, what="two replicas")
    yield controller, served
    controller.stop(stop_replicas=True)


def pool_of(served: Served) -> Pool:
    return served.engines[MODEL]


def test_replicas_of_one_deployment_go_to_different_nodes(cluster) -> None:
    controller, served = cluster
    replicas = ready(controller)
    assert len({r["node"] for r in replicas}) == 2  # on two different machines
    assert all(r["chip"] == CHIP and r["reason"] for r in replicas)
    assert {m["state"] for m in pool_of(served).status()} == {"ready"}


async def run_streams(pool: Pool, prompts: list[list[int]], params: SamplingParams, on_progress=None):
    """Streams every prompt at once; returns each one's tokens, finish reason and text."""
    got: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> tuple[list[int], str | None, str]:
        text, reason = "", None
        async for out in pool.generate(prompts[i], params):
            got[i].extend(out.new_token_ids)
            text += out.new_text
            reason = out.finish_reason
            if on_progress is not None:
                on_progress(got)
        return got[i], reason, text

    return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def test_a_node_killed_mid_load_loses_no_stream_and_its_replica_is_placed_again(cluster) -> None:
    controller, served = cluster
    pool = pool_of(served)
    tok = pool.tokenizer
    prompts = [tok.encode(f"t{i} t{i + 3} t{2 * i + 1}") for i in range(6)]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    undisturbed = asyncio.run(run_streams(pool, prompts, params))

    killed: list[str] = []

    def kill_when_under_way(got: list[list[int]]) -> None:
        if not killed and min(len(g) for g in got) >= 5:
            busy = next(m for m in pool.status() if m["in_flight"] > 0)
            killed.append(busy["node"])
            shared_pool().nodes[busy["node"]].kill()

    disturbed = asyncio.run(run_streams(pool, prompts, params, kill_when_under_way))

    assert killed, "the load never got under way"
    assert [d[1] for d in disturbed] == ["length"] * len(prompts)  # every stream completed
    assert [d[0] for d in disturbed] == [u[0] for u in undisturbed]  # greedy: the same tokens, none twice
    assert [d[2] for d in disturbed] == [u[2] for u in undisturbed]

    # The lost replica is placed again, on the machine that had none: the two stay on different machines.
    def replaced() -> bool:
        replicas = ready(controller)
        nodes = {r["node"] for r in replicas}
        return len(replicas) == 2 and killed[0] not in nodes and len(nodes) == 2

    wait_until(replaced, what="the lost replica placed again")
    assert [m["state"] for m in pool.status()] == ["ready", "ready"]
    node_with(killed[0], 2, CHIP)  # the machine comes back for the rest of the module


def test_a_request_arriving_after_a_node_died_is_served_by_the_living(cluster) -> None:
    controller, served = cluster
    wait_until(lambda: len(ready(controller)) == 2, what="two replicas")
    pool = pool_of(served)
    victim = pool.status()[0]["node"]
    shared_pool().nodes[victim].kill()
    prompts = [pool.tokenizer.encode("t1 t2 t3") for _ in range(4)]
    results = asyncio.run(run_streams(pool, prompts, SamplingParams(max_tokens=8, temperature=0.0)))
    assert all(len(tokens) >= 1 for tokens, _, _ in results)
    node_with(victim, 2, CHIP)
