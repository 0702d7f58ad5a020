"""Placement of a model that no single node holds: its decoder layers split over the fewest nodes (roomiest
first) whose memory together holds the weights and one sequence's cache (pipeline parallel, `engine/pipeline.py`).

Layers go to each node in proportion to its predicted speed (the chips model's decode time of the whole model
on that node's chip), so a faster node runs more of them; when that share does not fit a slower but roomier
node, in proportion to free memory instead. Every stage gets the same number of KV blocks (block ids are
global), as many as the tightest stage holds for its own layers. A split runs in a dtype format (fp32, bf16,
fp16): the engine splits plain weights only. Pure functions, like `placement`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cumulo.engine.kv_sizing import cache_dtype, kv_elements_per_token, size_kv_cache
from cumulo.engine.llm_engine import EngineConfig
from cumulo.engine.pipeline import split_layers
from cumulo.models.config import ModelConfig

SPLIT_FORMATS = ("bf16", "fp16", "fp32")  # best first; the engine's split loads plain weights only
BLOCK_SIZE = EngineConfig().block_size  # the engine's defaults, as placement uses them
MAX_NUM_SEQS = EngineConfig().max_num_seqs


@dataclass(frozen=True)
class StagePlacement:
    node: str
    layers: tuple[int, int]  # [first, end)
    weight: float  # the relative speed the split used
    gb: float  # weights and cache this stage holds


def _format(dep, chips: list[str], chip_of) -> str:
    if dep.format:
        return dep.format
    return next((f for f in SPLIT_FORMATS if all(f in chip_of(c).native for c in chips)), "fp32")


def place_over_nodes(dep, nodes: list, free: dict[str, list[float]], factor, predict, kv_budget, chip_of):
    """(Placement fields, [StagePlacement]) for the fewest nodes that hold `dep` split, or None.

    `predict(model, fmt, chip, batch, context, n)`, `kv_budget(chip, left_gb)`, `chip_of(chip)`: placement's own
    (passed in, so this module does not import it back)."""
    model = dep.model
    if not isinstance(model, ModelConfig) or model.num_hidden_layers < 2:
        return None
    if dep.format and dep.format not in SPLIT_FORMATS:
        return None
    seq_tokens = dep.prompt_tokens + dep.output_tokens
    roomiest = sorted((n for n in nodes if free[n.name]), key=lambda n: -max(free[n.name]))
    layers_total = model.num_hidden_layers
    for k in range(2, min(len(roomiest), layers_total) + 1):
        group = roomiest[:k]
        fmt = _format(dep, [n.chip for n in group], chip_of)
        preds = [predict(model, fmt, n.chip, 1, seq_tokens, 1) for n in group]
        weights_gb = preds[0].weights_gb
        speed = [factor(n.chip, fmt) / p.tpot_s for n, p in zip(group, preds, strict=True)]
        room = [max(free[n.name]) for n in group]
        for basis, weights in (("predicted speed", speed), ("free memory", room)):
            stages = _fit(model, group, fmt, weights, weights_gb, room, seq_tokens, kv_budget)
            if stages is not None:
                return _describe(
                    dep, group, fmt, basis, weights, stages, preds, weights_gb, seq_tokens, predict
                )
    return None


def _fit(model, group, fmt, weights, weights_gb, room, seq_tokens, kv_budget):
    """(layer ranges, KV blocks per stage, GB per stage) if every stage's share of the weights and the common
    cache fit its node, else None. A stage's share of the weights is taken as its share of the layers."""
    ranges = split_layers(model.num_hidden_layers, weights)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    share = [weights_gb * len(r) / model.num_hidden_layers for r in ranges]
    blocks = None
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


def _describe(dep, group, fmt, basis, weights, stages, preds, weights_gb, seq_tokens, predict):
    ranges, blocks, gb = stages
    total = dep.model.num_hidden_layers
    # each stage decodes its share of the layers in turn: the step takes the sum of the shares' times
    tpot_ms = sum(p.tpot_s * len(r) / total for p, r in zip(preds, ranges, strict=True)) * 1e3
    ttft_ms = (
        sum(
            predict(dep.model, fmt, n.chip, 1, dep.prompt_tokens, 1).ttft_s * len(r) / total
            for n, r in zip(group, ranges, strict=True)
        )
        * 1e3
    )
    batch = max(1, min(blocks * BLOCK_SIZE // seq_tokens, MAX_NUM_SEQS))
    meets = (dep.ttft_slo_ms is None or ttft_ms <= dep.ttft_slo_ms) and (
        dep.tpot_slo_ms is None or tpot_ms <= dep.tpot_slo_ms
    )
    placed = [
        StagePlacement(n.name, (r.start, r.stop), round(w, 6), g)
        for n, r, w, g in zip(group, ranges, weights, gb, strict=True)
    ]
    where = ", ".join(f"{s.node} layers {s.layers[0]}-{s.layers[1] - 1}" for s in placed)
    reason = (
        f"{fmt}; split over {len(group)} nodes (pipeline parallel): no single node holds weights "
        f"{weights_gb:.3g} GB and one {seq_tokens}-token sequence's cache; {where}, in proportion to "
        f"{basis}; every stage keeps {blocks} KV blocks of its own layers"
    )
    return dict(
        format=fmt,
        weights_gb=weights_gb,
        kv_blocks=blocks,
        batch=batch,
        tpot_ms=tpot_ms,
        ttft_ms=ttft_ms,
        goodput=batch / tpot_ms * 1e3 if meets else 0.0,
        reason=reason,
        stages=tuple(placed),
    )
