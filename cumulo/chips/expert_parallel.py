"""One step of a mixture-of-experts model under expert parallelism (EP), per chip.

The layout is the one DeepSeek's and Huawei's serving papers describe: attention, dense layers and shared experts
are replicated on every chip (data parallel), the routed experts (plus any redundant copies) are spread over the
n chips, and each MoE layer moves every token to the chips of its k experts and back (dispatch + combine). A
chip reads its experts' weights once per step for all tokens routed to them, so the expert bytes it reads grow
with the number of distinct experts the step touches, which saturates at all of its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from cumulo.chips.catalog import Chip
from cumulo.chips.presets import ModelShape
from cumulo.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class EPLayout:
    n_chips: int
    redundant_experts: int = 0  # extra copies of hot experts (EPLB), held on top of the routed experts

    def experts_per_chip(self, shape: ModelShape) -> float:
        return (shape.num_experts + self.redundant_experts) / self.n_chips


@dataclass(frozen=True, slots=True)
class EPStep:
    seconds: float
    bound: str  # "compute" | "memory" | "interconnect"
    comm_s: float  # the all-to-all time of the step, before overlap


@dataclass(frozen=True, slots=True)
class Rates:
    """What one chip sustains: matmul and attention FLOP/s, memory bytes/s, all-to-all bytes/s one way."""

    linear_flops: float
    attention_flops: float
    memory_bytes: float
    alltoall_bytes: float
    alltoall_latency_s: float


def touched_share(shape: ModelShape, tokens: float) -> float:
    """Share of a layer's routed experts that `tokens` tokens hit, with uniform routing: an expert is missed by
    one token with probability 1 - k/E, by all of them with that to the power `tokens`."""
    return 1.0 - (1.0 - shape.experts_per_token / shape.num_experts) ** max(tokens, 1.0)


def weight_bytes_per_chip(
    shape: ModelShape, layout: EPLayout, w_bytes: float, head_bytes: float, touched: float = 1.0
) -> float:
    """The replicated dense part plus this chip's experts (a `touched` share of them); the embedding table
    is stored once per chip too."""
    dense = (shape.dense_params - shape.head_params) * w_bytes + shape.head_params * head_bytes
    experts = layout.experts_per_chip(shape) * touched * shape.expert_size * w_bytes
    return dense + experts


def alltoall_rates(chip: Chip, n: int, interconnect_efficiency: float) -> tuple[float, str]:
    """Bytes/s one way per chip for dispatch and combine: the measured all-to-all rate where the catalog has
    one (`alltoall_gbs`), else the link: the scale-up link within `scaleup_chips`, the scale-out network
    beyond, at `interconnect_efficiency`."""
    measured = chip.get("alltoall_gbs")
    if measured:
        return measured * 1e9, "measured all-to-all"
    domain = chip.get("scaleup_chips")
    key = "scaleout_gbs" if domain and n > domain else "interconnect_gbs"
    link = chip.get(key) or 0.0
    if link <= 0:
        raise InvalidRequest(f"chip '{chip.id}' has no published {key}; expert parallelism needs it")
    return link / 2 * 1e9 * interconnect_efficiency, key


def ep_step(
    shape: ModelShape,
    layout: EPLayout,
    rates: Rates,
    *,
    tokens: float,  # tokens this chip computes in the step (its sequences x tokens each)
    attn_flops: float,  # this chip's attention FLOPs in the step
    kv_bytes: float,  # KV cache bytes this chip reads and writes in the step
    act_bytes_moved: float,  # activation traffic (norms, residuals)
    logits: float,  # tokens that run the LM head
    w_bytes: float,
    head_bytes: float,
    dispatch_elem_bytes: float,
    combine_elem_bytes: float,
    extra_layers: int = 0,  # MTP modules run per step, as decoder layers
    layer_overhead_s: float = 0.0,
    imbalance: float = 1.0,
) -> EPStep:
    """Per-chip step time. Matmuls and attention run one after the other, each bounded by its FLOPs or its
    bytes; the all-to-all of each MoE layer overlaps with compute (two micro-batches, as DeepSeek's dual
    micro-batch overlap and CloudMatrix-Infer's micro-batch pipeline do), so the step takes the longer of the
    two, times `imbalance` (every chip waits for the slowest: hot experts, uneven sequence lengths), plus a
    fixed cost per layer."""
    n = layout.n_chips
    touched = touched_share(shape, tokens * n)
    weights = weight_bytes_per_chip(shape, layout, w_bytes, head_bytes, touched)
    body = shape.dense_params - shape.head_params
    # Balanced routing: a chip multiplies, on average, k expert rows per token it owns.
    lin_flops = (
        2 * (body + shape.experts_per_token * shape.expert_size) * tokens + 2 * shape.head_params * logits
    )
    t_lin_c = lin_flops / rates.linear_flops
    t_lin_m = weights / rates.memory_bytes
    t_att_c = attn_flops / rates.attention_flops
    t_att_m = (kv_bytes + act_bytes_moved) / rates.memory_bytes
    scale = (shape.num_layers + extra_layers) / shape.num_layers
    t_work = (max(t_lin_c, t_lin_m) + max(t_att_c, t_att_m)) * scale
    remote = (n - 1) / n  # tokens whose expert sits on this chip stay here
    per_layer = tokens * shape.experts_per_token * shape.hidden_size * remote
    wire = per_layer * (dispatch_elem_bytes + combine_elem_bytes) / rates.alltoall_bytes
    t_comm = (shape.moe_layers + extra_layers) * (wire + 2 * rates.alltoall_latency_s) if n > 1 else 0.0
    compute = t_lin_c + t_att_c >= t_lin_m + t_att_m
    bound = "interconnect" if t_comm > t_work else ("compute" if compute else "memory")
    overhead = (shape.num_layers + extra_layers) * layer_overhead_s
    return EPStep(max(t_work, t_comm) * imbalance + overhead, bound, t_comm)
