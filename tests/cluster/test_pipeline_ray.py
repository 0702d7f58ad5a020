"""A model split over two nodes of a real local Ray cluster whose memory is capped below what the whole model
needs: each stage actor loads only its own layers on its own node, and greedy output equals the unsplit
engine's token for token, whether the split replica is started by hand or by the controller from placement."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import pytest
import ray

from cumulo.cluster.controller import Controller, Wanted, live_nodes
from cumulo.cluster.replica import RayReplica
from cumulo.cluster.stage import stage_memory_bytes
from cumulo.contracts import SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm import LLM
from cumulo.engine.llm_engine import EngineConfig
from cumulo.engine.pipeline_factory import stage_specs
from cumulo.engine.stage_load import StageSpec
from cumulo.errors import EngineUnavailable
from tests.support.pipeline import write_llama_dir
from tests.support.ray_pool import Node, _start, node_with, shared_pool

CHIP = "cpu-avx2-2core"
NODES = ("pp-a", "pp-b")  # only these nodes are offered to this module's controller
CAP = 1_070_000  # bytes of memory each node offers Ray: a stage fits, the whole model does not
OPTIONS = dict(device="cpu", dtype="float32", kv_cache_gib=0.00037, decode_graphs=False)
PROMPTS = [[5, 9, 13, 40, 22], [7] * 3 + list(range(10, 47)), list(range(3, 60))]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def capped_node(name: str) -> str:
    """Node `name` in the shared test pool, offering Ray only CAP bytes of memory; its Ray node id."""
    pool = shared_pool()
    labels = {"cumulo-name": name, "cumulo-kind": "cpu", "cumulo-chip": CHIP}
    pool.nodes[name] = Node(name, _start([
        f"--address={pool.address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--memory={CAP}",
        "--labels", json.dumps(labels), "--resources", json.dumps({f"chip:{CHIP}": 1}),
    ]))  # fmt: skip
    return node_with(name)


@pytest.fixture(scope="module")
def split_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], list[list[int]]]:
    """(model path, the two capped nodes' ids, the unsplit engine's greedy answers to PROMPTS)."""
    path = str(write_llama_dir(tmp_path_factory.mktemp("models") / "llama4", layers=4))
    reference = LLM(create_engine(path, EngineConfig(**OPTIONS))).generate(PROMPTS, GREEDY)  # type: ignore[arg-type]
    return path, [capped_node(n) for n in NODES], [r.token_ids for r in reference]


async def answers(client) -> list[list[int]]:
    async def one(prompt: list[int]) -> list[int]:
        out: list[int] = []
        async for delta in client.generate(prompt, GREEDY):
            out.extend(delta.new_token_ids)
        return out

    return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


def test_split_over_two_memory_capped_nodes_answers_as_the_unsplit_engine(split_pool) -> None:
    path, nodes, reference = split_pool
    specs, plan = stage_specs(path, EngineConfig(pipeline_stages=2, **OPTIONS))  # type: ignore[arg-type]
    whole = StageSpec(path, range(4), True, True, plan.num_blocks, plan.block_size, plan.dtype)
    assert max(stage_memory_bytes(s) for s in specs) <= CAP < stage_memory_bytes(whole)
    offered = {n["NodeID"]: n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]}
    assert all(offered[n] == CAP for n in nodes)

    replica = RayReplica.start(
        path, name=f"pp#{uuid.uuid4().hex[:6]}", node_id=nodes[0], num_cpus=0, stage_nodes=nodes, **OPTIONS
    )
    try:
        stages = asyncio.run(replica.status())["stages"]
        assert [s["node_id"] for s in stages] == nodes  # one stage on each node
        assert [s["layers"] for s in stages] == [[0, 2], [2, 4]]
        got = asyncio.run(answers(replica))
        assert got == reference
        # A machine holding a stage dies: the replica ends itself, so the pool sees it lost, as any other.
        shared_pool().nodes[NODES[1]].kill()
        with pytest.raises(EngineUnavailable):
            asyncio.run(answers(replica))
        assert not asyncio.run(replica.health()).ok
    finally:
        replica.shutdown()
        capped_node(NODES[1])  # the machine comes back for the next test


def test_the_controller_places_a_model_no_node_holds_split_over_two_nodes(split_pool) -> None:
    path, nodes, reference = split_pool

    class Served:
        engines: dict = {}

    served = Served()
    wanted = [Wanted("llama4", path, 1, format="fp32", chip=CHIP)]
    controller = Controller(
        lambda: wanted,
        lambda engines: setattr(served, "engines", engines),
        period_s=0.5,
        retry_s=1.0,
        engine_options={"decode_graphs": False},
        list_nodes=lambda: [n for n in live_nodes() if n.name in NODES],
    )
    controller.start()
    try:
        deadline = time.monotonic() + 240
        while not [r for r in controller.replicas("llama4") if r["state"] == "ready"]:
            assert time.monotonic() < deadline, controller.replicas("llama4")
            time.sleep(0.3)
        (row,) = controller.replicas("llama4")
        assert "split over 2 nodes" in row["reason"]
        assert re.search(r"(pp-a|pp-b) layers 0-1, (?!\1)(pp-a|pp-b) layers 2-3", row["reason"]), row[
            "reason"
        ]
        assert asyncio.run(answers(served.engines["llama4"])) == reference
    finally:
        controller.stop(stop_replicas=True)
