"""Placement of a model that no single node holds: its decoder layers split over the fewest nodes (roomiest
first) whose memory together holds the weights and one sequence's cache (pipeline parallel, `engine/pipeline.py`).

Layers go to each node in proportion to its predicted speed (the chips model's decode time of the whole model
on that node's chip), so a faster node runs more of them; when that share does not fit a slower but roomier
node, in proportion to free memory instead. Every stage gets the same number of KV blocks (block ids are
global), as many as the tightest stage holds for its own layers. A split runs in a dtype format (fp32, bf16,
fp16) or in the compact format its checkpoint is stored in: its stages convert nothing on load. Pure functions,
like `placement`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cumulo.engine.kv_sizing import cache_dtype, kv_elements_per_token, size_kv_cache
from cumulo.engine.llm_engine import EngineConfig
from cumulo.engine.pipeline import split_layers
from cumulo.models.config import ModelConfig

if TYPE_CHECKING:
    from cumulo.chips.predict import Prediction
    from cumulo.cluster.placement import DeploymentSpec, NodeSpec

SPLIT_FORMATS = ("bf16", "fp16", "fp32")  # best first; the engine's split converts nothing on load
BLOCK_SIZE = EngineConfig().block_size  # the engine's defaults, as placement uses them
MAX_NUM_SEQS = EngineConfig().max_num_seqs

Predict = Callable[
    [ModelConfig, str, str, int, int, int], "Prediction"
]  # (model, fmt, chip, batch, context, n)


@dataclass(frozen=True)
class StagePlacement:
    node: str
    layers: tuple[int, int]  # [first, end)
    weight: float  # the relative speed (or free memory) the layers were split by
    gb: float  # weights and cache this stage holds


@dataclass(frozen=True)
class SplitPlan:
    """A replica split over several nodes, as placement turns it into a `Placement`."""

    stages: tuple[StagePlacement, ...]
    format: str
    weights_gb: float  # the whole model's
    kv_blocks: int  # every stage's
    batch: int
    ttft_ms: float
    tpot_ms: float
    goodput: float
    reason: str


def place_over_nodes(
    dep: DeploymentSpec,
    nodes: list[NodeSpec],
    free: dict[str, list[float]],
    factor: Callable[[str, str], float],
    predict: Predict,
    kv_budget: Callable[[str, float], int],
    chip_of: Callable[[str], Any],
) -> SplitPlan | None:
    """The split over the fewest nodes that hold `dep`, or None (a preset without a config, a compact
    format other than the one its checkpoint is stored in, or not enough memory even together). `free`: GB free per device of each node.

    `predict`, `kv_budget(chip, left_gb)` and `chip_of(chip)` are placement's own (passed in, so this module
    does not import it back)."""
    model = dep.model
    if not isinstance(model, ModelConfig) or model.num_hidden_layers < 2:
        return None
    if dep.format and dep.format not in (*SPLIT_FORMATS, model.stored_format):  # stages convert nothing
        return None
    seq_tokens = dep.prompt_tokens + dep.output_tokens
    usable = [n for n in nodes if free[n.name] and (dep.chip is None or n.chip == dep.chip)]
    roomiest = sorted(usable, key=lambda n: -max(free[n.name]))
    for k in range(2, min(len(roomiest), model.num_hidden_layers) + 1):
        group = roomiest[:k]
        fmt = dep.format or next(
            (f for f in SPLIT_FORMATS if all(f in chip_of(n.chip).native for n in group)), "fp32"
        )
        preds = [predict(model, fmt, n.chip, 1, seq_tokens, 1) for n in group]
        speed = [factor(n.chip, fmt) / p.tpot_s for n, p in zip(group, preds, strict=True)]
        room = [max(free[n.name]) for n in group]
        for basis, weights in (("predicted speed", speed), ("free memory", room)):
            fit = _fit(model, group, fmt, weights, preds[0].weights_gb, room, seq_tokens, kv_budget)
            if fit is not None:
                return _plan(dep, model, group, fmt, basis, weights, fit, preds, predict)
    return None


def _fit(
    model: ModelConfig,
    group: list[NodeSpec],
    fmt: str,
    weights: list[float],
    weights_gb: float,
    room: list[float],
    seq_tokens: int,
    kv_budget: Callable[[str, float], int],
) -> tuple[list[range], int, list[float]] | None:
    """(layer ranges, KV blocks per stage, GB per stage) if every stage's share of the weights and the common
    cache fit its node, else None. A stage's share of the weights is taken as its share of the layers."""
    ranges = split_layers(model.num_hidden_layers, weights)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    share = [weights_gb * len(r) / model.num_hidden_layers for r in ranges]
    blocks: int | None = None
    for node, r, s, left in zip(group, ranges, share, room, strict=True):
        if left - s <= 0:
            return None
        plan = size_kv_cache(kv_budget(node.chip, left - s), model, dtype, BLOCK_SIZE, num_layers=len(r))
        blocks = plan.num_blocks if blocks is None else min(blocks, plan.num_blocks)
    if blocks is None or blocks * BLOCK_SIZE < seq_tokens:
        return None
    itemsize = cache_dtype(dtype).itemsize
    gb = [
        s + blocks * BLOCK_SIZE * kv_elements_per_token(model, len(r)) * itemsize / 1e9
        for s, r in zip(share, ranges, strict=True)
    ]
    return ranges, blocks, gb


def _plan(
    dep: DeploymentSpec,
    model: ModelConfig,
    group: list[NodeSpec],
    fmt: str,
    basis: str,
    weights: list[float],
    fit: tuple[list[range], int, list[float]],
    preds: list[Prediction],
    predict: Predict,
) -> SplitPlan:
    ranges, blocks, gb = fit
    total = model.num_hidden_layers
    # the stages run their shares of the layers one after another: a step takes the sum of the shares' times
    tpot_ms = sum(p.tpot_s * len(r) / total for p, r in zip(preds, ranges, strict=True)) * 1e3
    prefill = [predict(model, fmt, n.chip, 1, dep.prompt_tokens, 1) for n in group]
    ttft_ms = sum(p.ttft_s * len(r) / total for p, r in zip(prefill, ranges, strict=True)) * 1e3
    seq_tokens = dep.prompt_tokens + dep.output_tokens
    batch = max(1, min(blocks // math.ceil(seq_tokens / BLOCK_SIZE), MAX_NUM_SEQS))
    meets = (dep.ttft_slo_ms is None or ttft_ms <= dep.ttft_slo_ms) and (
        dep.tpot_slo_ms is None or tpot_ms <= dep.tpot_slo_ms
    )
    stages = tuple(
        StagePlacement(n.name, (r.start, r.stop), round(w, 6), g)
        for n, r, w, g in zip(group, ranges, weights, gb, strict=True)
    )
    where = ", ".join(f"{s.node} layers {s.layers[0]}-{s.layers[1] - 1}" for s in stages)
    weights_gb = preds[0].weights_gb
    reason = (
        f"{fmt}; split over {len(group)} nodes (pipeline parallel): no single node holds weights "
        f"{weights_gb:.3g} GB and one {seq_tokens}-token sequence's cache; {where}, in proportion to "
        f"{basis}; every stage keeps {blocks} KV blocks of its own layers"
    )
    goodput = batch / tpot_ms * 1e3 if meets else 0.0
    return SplitPlan(stages, fmt, weights_gb, blocks, batch, ttft_ms, tpot_ms, goodput, reason)
