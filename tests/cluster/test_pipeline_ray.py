"""A model split over two nodes of a real local Ray cluster: each node's memory is capped below what the whole
model needs, each stage actor loads only its own layers on its own node, and greedy output equals the unsplit
engine's token for token."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import ray

from cumulo.cluster.replica import RayReplica
from cumulo.cluster.stage import stage_memory_bytes
from cumulo.contracts import SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm import LLM
from cumulo.engine.llm_engine import EngineConfig
from cumulo.engine.pipeline_factory import stage_specs
from cumulo.engine.stage_load import StageSpec
from tests.support.pipeline import write_llama_dir
from tests.support.ray_pool import Node, _start, node_with, shared_pool

CHIP = "cpu-avx2-8core"  # a chip of these nodes' own, so no other module's replica lands here
OPTIONS = dict(device="cpu", dtype="float32", kv_cache_gib=0.0005, decode_graphs=False)
PROMPTS = [[5, 9, 13, 40, 22], [7] * 3 + list(range(10, 47)), list(range(3, 60))]


def capped_node(name: str, memory_bytes: int) -> str:
    """Node `name` in the shared test pool, offering Ray only `memory_bytes` of memory; its Ray node id."""
    pool = shared_pool()
    labels = {"cumulo-name": name, "cumulo-kind": "cpu", "cumulo-chip": CHIP}
    pool.nodes[name] = Node(name, _start([
        f"--address={pool.address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--memory={memory_bytes}",
        "--labels", json.dumps(labels), "--resources", json.dumps({f"chip:{CHIP}": 1}),
    ]))  # fmt: skip
    return node_with(name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_dir(tmp_path_factory.mktemp("models") / "llama4", layers=4)


def test_split_over_two_memory_capped_nodes_answers_as_the_unsplit_engine(model_dir: Path) -> None:
    path = str(model_dir)
    specs, plan = stage_specs(path, EngineConfig(pipeline_stages=2, **OPTIONS))  # type: ignore[arg-type]
    stage_need = max(stage_memory_bytes(s) for s in specs)
    whole = StageSpec(path, range(4), True, True, plan.num_blocks, plan.block_size, plan.dtype)
    whole_need = stage_memory_bytes(whole)
    cap = (stage_need + whole_need) // 2  # each node holds one stage, none the whole model
    assert stage_need <= cap < whole_need
    nodes = [capped_node(name, cap) for name in ("pp-a", "pp-b")]
    offered = {n["NodeID"]: n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]}
    assert all(offered[n] < whole_need for n in nodes)

    replica = RayReplica.start(
        path, name=f"pp#{uuid.uuid4().hex[:6]}", node_id=nodes[0], num_cpus=0.5, stage_nodes=nodes, **OPTIONS
    )
    try:
        status = asyncio.run(replica.status())
        stages = status["stages"]
        assert [s["node_id"] for s in stages] == nodes  # one stage on each node
        assert [s["layers"] for s in stages] == [[0, 2], [2, 4]]
        assert sum(s["weights_bytes"] for s in stages) < 2 * max(s["weights_bytes"] for s in stages)

        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

        async def answer(prompt: list[int]) -> list[int]:
            out: list[int] = []
            async for delta in replica.generate(prompt, params):
                out.extend(delta.new_token_ids)
            return out

        async def every() -> list[list[int]]:
            return list(await asyncio.gather(*(answer(p) for p in PROMPTS)))

        got = asyncio.run(every())
    finally:
        replica.shutdown()
    reference = LLM(create_engine(path, EngineConfig(**OPTIONS))).generate(PROMPTS, params)  # type: ignore[arg-type]
    assert got == [r.token_ids for r in reference]
