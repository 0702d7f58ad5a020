"""Builds an `LLMEngine` over a model split into pipeline stages (`EngineConfig.pipeline_stages > 1`): plans the
split and the KV cache, builds each stage from only its own tensors, and hands the engine a `PipelineRunner`.

The stages run in this process unless `make_stages` says otherwise (`cumulo.cluster.stage` puts each on a Ray
actor of its own). The driver loads no weights: only the config, the tokenizer and the seal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cumulo.engine.factory import resolve_dtype
from cumulo.engine.kv_sizing import KVPlan, plan_kv_cache
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.engine.pipeline import LocalStages, PipelineRunner, Stages, split_layers
from cumulo.engine.stage_load import StageSpec, build_stage, load_meta, stage_config
from cumulo.errors import InvalidRequest
from cumulo.platform import get_platform


def stage_specs(model: str, config: EngineConfig) -> tuple[list[StageSpec], KVPlan]:
    """One spec per stage, and the KV plan every stage shares (sized for the stage with the most layers)."""
    weights = config.stage_weights or (1.0,) * config.pipeline_stages
    if len(weights) != config.pipeline_stages:
        raise InvalidRequest(f"{len(weights)} stage weights for {config.pipeline_stages} pipeline stages")
    platform = get_platform(config.device)
    dtype = resolve_dtype(config.dtype, platform)
    cfg = stage_config(model)
    ranges = split_layers(cfg.num_hidden_layers, weights)
    plan = plan_kv_cache(cfg, dtype, config, platform, num_layers=max(len(r) for r in ranges))
    specs = [
        StageSpec(
            model=model,
            layers=r,
            first=i == 0,
            last=i == len(ranges) - 1,
            num_blocks=plan.num_blocks,
            block_size=plan.block_size,
            cache_dtype=plan.dtype,
            dtype=str(dtype).removeprefix("torch."),
            device=config.device,
            threads=config.threads,
        )
        for i, r in enumerate(ranges)
    ]
    return specs, plan


def create_split_engine(
    model: str, config: EngineConfig, make_stages: Callable[[list[StageSpec]], Stages] | None = None
) -> LLMEngine:
    if config.format or config.head is not None:
        raise InvalidRequest("a model split over pipeline stages runs in its stored format (no --format yet)")
    specs, plan = stage_specs(model, config)
    stages = make_stages(specs) if make_stages else LocalStages([build_stage(s) for s in specs])
    meta = load_meta(model)
    runner = PipelineRunner(stages, meta.config, plan.block_size, [s.layers for s in specs])
    return LLMEngine(
        None,
        meta.tokenizer,
        config,
        plan,
        device=torch.device(
            "cpu"
        ),  # the driver samples here: the last stage sends its logits back on the CPU
        name=meta.name,
        seal=meta.seal,
        pipeline=runner,
    )
