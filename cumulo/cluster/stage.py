"""Pipeline stages on Ray actors: each `StageActor` loads only its own layers' tensors and allocates a KV cache
for those layers, on the node it was placed on; `RayStages` is how the replica's engine (the driver: scheduler,
block manager, sampler) runs a step through them.

A step is one chain of actor calls: each stage's output reference is the next one's input, so hidden states go
from stage to stage through Ray's object store without passing the driver; only the last stage's logits come
back. Stage actors belong to the replica actor that made them (not detached): if it dies, they die with it; if
a stage dies, the next step fails and the replica reports itself lost, as a replica on a dead node does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cumulo.engine.pipeline import StepInputs
from cumulo.engine.stage_load import StageSpec, build_stage
from cumulo.errors import EngineUnavailable

START_TIMEOUT_S = 600.0


class StageActor:
    """Runs inside the Ray actor: one stage's weights, cache and forward."""

    def __init__(self, spec: StageSpec) -> None:
        import ray

        self.worker = build_stage(spec)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.layers = spec.layers

    def where(self) -> tuple[str, range, int]:
        """(node id, layers, bytes of weights held): what the replica reports of its split."""
        held = sum(p.numel() * p.element_size() for p in self.worker.model.parameters())
        return self.node_id, self.layers, held

    def run(
        self, x: torch.Tensor, positions: torch.Tensor, step: StepInputs, sample_rows: list[int]
    ) -> torch.Tensor:
        return self.worker.run(x, positions, step, sample_rows).cpu()


@dataclass(frozen=True, slots=True)
class StageInfo:
    node_id: str
    layers: range
    weights_bytes: int


def stage_memory_bytes(spec: StageSpec) -> int:
    """What a stage will hold: its tensors (sizes read from the checkpoint's headers, in the compute dtype)
    plus its KV cache. Asked of Ray as the actor's `memory`, so a stage goes only where it fits."""
    from safetensors import safe_open

    from cumulo.engine.stage_load import checkpoint_dir, stage_config, stage_tensors
    from cumulo.models import hf

    path = checkpoint_dir(spec.model)
    config = stage_config(spec.model)
    wanted = stage_tensors(config, spec.layers, spec.first, spec.last)
    itemsize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    elements = 0
    for file in hf.weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if wanted(name):
                    elements += math.prod(f.get_slice(name).get_shape())
    if config.kv_lora_rank:
        per_token = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_token = 2 * config.num_key_value_heads * config.head_dim
    cache = len(spec.layers) * per_token * spec.num_blocks * spec.block_size * spec.cache_dtype.itemsize
    return elements * itemsize + cache


class RayStages:
    """The driver's handle on its stage actors (`engine.pipeline.Stages`)."""

    def __init__(self, actors: list[Any], infos: list[StageInfo]) -> None:
        self.actors, self.infos = actors, infos
        self.on_lost: Callable[[str], None] | None = None  # called once a stage is found dead

    @classmethod
    def start(
        cls,
        specs: list[StageSpec],
        node_ids: list[str],
        num_cpus: float = 1,
        timeout: float = START_TIMEOUT_S,
    ) -> RayStages:
        """One actor per spec on the node of the same index, each asking Ray for the memory its stage holds;
        waits until every stage has loaded."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if len(node_ids) != len(specs):
            raise ValueError(f"{len(specs)} stages need {len(specs)} nodes, got {len(node_ids)}")
        remote = ray.remote(StageActor)
        actors = [
            remote.options(
                num_cpus=num_cpus,
                memory=stage_memory_bytes(spec),
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(spec.threads or max(1, int(num_cpus)))}},
            ).remote(spec)
            for spec, node in zip(specs, node_ids, strict=True)
        ]
        try:
            where = ray.get([a.where.remote() for a in actors], timeout=timeout)
        except Exception as exc:
            for a in actors:
                ray.kill(a)
            raise EngineUnavailable(f"a pipeline stage did not start: {type(exc).__name__}: {exc}") from None
        return cls(actors, [StageInfo(*w) for w in where])

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepInputs, sample_rows: list[int]
    ) -> torch.Tensor:
        import ray

        shared = [ray.put(positions), ray.put(step), ray.put(sample_rows)]  # sent once, read by every stage
        x: Any = input_ids
        for actor in self.actors:
            x = actor.run.remote(x, *shared)
        try:
            return ray.get(x)
        except ray.exceptions.RayActorError as exc:
            why = f"a pipeline stage is lost: {type(exc).__name__}"
            if self.on_lost is not None:
                self.on_lost(why)
            raise EngineUnavailable(why) from None

    def stop(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
