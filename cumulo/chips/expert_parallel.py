"""One step of a mixture-of-experts model under expert parallelism (EP), per chip.

The layout is the one DeepSeek's and Huawei's serving papers describe: attention, dense layers and shared experts
are replicated on every chip (data parallel), the routed experts (plus any redundant copies) are spread over the
n chips, and each MoE layer moves every token to the chips of its k experts and back (dispatch + combine). A
chip reads its experts' weights once per step for all tokens routed to them, so the expert bytes it reads grow
with the number of distinct experts the step touches, which saturates at all of its experts.

How a token travels depends on the kernel (DeepEP's two kinds, docs/chips.md): decode's low-latency kernels send
one copy per selected expert straight over the network; prefill's high-throughput ("normal") kernels send a token
once per destination *node* over the scale-out network and fan it out to the chips there over the scale-up link,
which node-limited routing (DeepSeek-V3: at most 4 nodes per token) keeps cheap.
"""

from __future__ import annotations

import math
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
    """What one chip sustains: matmul and attention FLOP/s, memory bytes/s."""

    linear_flops: float
    attention_flops: float
    memory_bytes: float


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


@dataclass(frozen=True, slots=True)
class AllToAll:
    """One MoE layer's dispatch + combine as one chip's kernel moves it: over each link the kernel drives at once,
    `copies` of every token the chip owns at `rate` bytes/s one way; the slowest link sets the time."""

    kernel: str  # "low-latency", "high-throughput", or the link a chip without measured kernels falls back to
    links: tuple[tuple[float, float], ...]  # (copies of each token, bytes/s)
    latency_s: float
    compute_share: float = (
        1.0  # share of the chip's cores left to matmuls and attention while the kernel runs
    )

    def seconds_per_token_byte(self) -> float:
        return max(copies / rate for copies, rate in self.links)


def distinct(slots: float, picks: int) -> float:
    """Expected distinct slots that `picks` uniform picks hit (experts' chips, nodes)."""
    return slots * (1.0 - (1.0 - 1.0 / slots) ** picks) if slots > 1 else 1.0


def nodes_per_token(shape: ModelShape, nodes: int) -> float:
    """Distinct nodes a token's k experts sit on. Group-limited routing (DeepSeek-V3: 8 groups, the best 4
    eligible) with groups laid out over contiguous chips caps them at the eligible groups' nodes: the V3
    report's node-limited routing, at most 4 nodes per token when groups and nodes coincide."""
    eligible = float(nodes)
    if shape.expert_groups > 1 and shape.groups_per_token < shape.expert_groups:
        eligible = min(nodes, shape.groups_per_token * math.ceil(nodes / shape.expert_groups))
    return distinct(eligible, shape.experts_per_token)


def alltoall_plan(
    chip: Chip, shape: ModelShape, n: int, *, prefill: bool, interconnect_efficiency: float, latency_s: float
) -> AllToAll:
    """How dispatch and combine move tokens on `chip` over `n` chips.

    Prefill on a chip with measured high-throughput kernels (`bulk_alltoall_scaleup_gbs`, and beyond one
    scale-up domain `bulk_alltoall_scaleout_gbs`): a token crosses the scale-out network once per distinct node
    and reaches each distinct chip over the scale-up link, both counted as DeepEP's benchmarks count their
    "logical" bandwidth (the sender's own node and chip included). Otherwise, and always in decode, one copy per
    remote expert at the measured low-latency rate (`alltoall_gbs`), or without one at the link's rate
    (`interconnect_gbs` within `scaleup_chips`, else `scaleout_gbs`) x `interconnect_efficiency`."""
    if n <= 1:
        return AllToAll("none", ((0.0, 1.0),), 0.0)
    k = shape.experts_per_token
    domain = int(chip.get("scaleup_chips") or n)
    up, out = chip.get("bulk_alltoall_scaleup_gbs"), chip.get("bulk_alltoall_scaleout_gbs")
    if prefill and up and (n <= domain or out):
        links = [(distinct(n, k), up * 1e9)]
        if n > domain:
            links.append((nodes_per_token(shape, math.ceil(n / domain)), out * 1e9))  # type: ignore[operator]
        share = 1.0 - (chip.get("bulk_alltoall_core_share") or 0.0)
        return AllToAll("high-throughput", tuple(links), latency_s, share)
    remote = k * (n - 1) / n  # copies whose expert sits on another chip
    measured = chip.get("alltoall_gbs")
    if measured:
        return AllToAll("low-latency", ((remote, measured * 1e9),), latency_s)
    key = "scaleout_gbs" if n > domain else "interconnect_gbs"
    link = chip.get(key) or 0.0
    if link <= 0:
        raise InvalidRequest(f"chip '{chip.id}' has no published {key}; expert parallelism needs it")
    return AllToAll(key, ((remote, link / 2 * 1e9 * interconnect_efficiency),), latency_s)


def paired_layer_s(attn: float, mlp: float, dispatch: float, combine: float) -> float:
    """One MoE layer under two micro-batches, each carrying half the tokens: while one micro-batch computes, the
    other's dispatch or combine runs, and each communication hides only under the compute block it is paired
    with (DeepSeek's prefill overlap, Day 6 and profile-data): attention with the other's dispatch, MoE with the
    other's dispatch, MoE with its combine, attention with the other's combine. Arguments are whole-step times of
    one layer; each pair takes the longer of its two halves."""
    pairs = ((attn, dispatch), (mlp, dispatch), (mlp, combine), (attn, combine))
    return sum(max(work, comm) for work, comm in pairs) / 2


def ep_step(
    shape: ModelShape,
    layout: EPLayout,
    rates: Rates,
    a2a: AllToAll,
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
    expand_flops: float = 0.0,  # matmul FLOPs that expand cached MLA latents to keys and values (prefill)
    micro_batches: int = 1,  # 2: prefill's paired overlap (paired_layer_s); 1: communication hides whole
) -> EPStep:
    """Per-chip step time. A layer's attention (projections, then the attention core) and its MLP (shared and
    routed experts, or the dense MLP) run one after the other, each bounded by its FLOPs or its bytes.

    The all-to-all of each MoE layer overlaps with compute. With `micro_batches=1` it hides under the whole step
    (decode: DeepSeek's 5-stage pipeline, CloudMatrix-Infer's micro-batch pipeline), so the step takes the
    longer of the two; with 2 (prefill's dual micro-batch), each dispatch and combine hides only under the
    compute block it is paired with, and the dense layers, which have no all-to-all, add their compute in full.
    Times `imbalance` (every chip waits for the slowest: hot experts, uneven sequence lengths), plus a fixed cost
    per layer."""
    n = layout.n_chips
    touched = touched_share(shape, tokens * n)
    weights = weight_bytes_per_chip(shape, layout, w_bytes, head_bytes, touched)
    attn_weights = shape.attn_params * w_bytes
    body = shape.dense_params - shape.head_params
    # Balanced routing: a chip multiplies, on average, k expert rows per token it owns.
    lin_attn = 2 * shape.attn_params * tokens + expand_flops
    lin_mlp = (
        2 * (body - shape.attn_params + shape.experts_per_token * shape.expert_size) * tokens
        + 2 * shape.head_params * logits
    )
    # Cores that run the all-to-all kernel (DeepEP's normal kernels hold SMs) do not multiply meanwhile.
    linear, attention = rates.linear_flops * a2a.compute_share, rates.attention_flops * a2a.compute_share
    t_attn_c = lin_attn / linear + attn_flops / attention
    t_attn_m = (attn_weights + kv_bytes + act_bytes_moved) / rates.memory_bytes
    t_attn = max(lin_attn / linear, attn_weights / rates.memory_bytes) + max(
        attn_flops / attention, (kv_bytes + act_bytes_moved) / rates.memory_bytes
    )
    t_mlp_c, t_mlp_m = lin_mlp / linear, (weights - attn_weights) / rates.memory_bytes
    t_mlp = max(t_mlp_c, t_mlp_m)
    layers, moe = shape.num_layers + extra_layers, shape.moe_layers + extra_layers
    t_work = (t_attn + t_mlp) * layers / shape.num_layers
    token_bytes = shape.hidden_size * (dispatch_elem_bytes + combine_elem_bytes)
    wire = tokens * token_bytes * a2a.seconds_per_token_byte() if n > 1 else 0.0
    latency = a2a.latency_s if n > 1 else 0.0
    t_comm = moe * (wire + 2 * latency)
    if micro_batches == 2 and n > 1:
        attn_l, mlp_l = t_attn / shape.num_layers, t_mlp / shape.num_layers
        share = dispatch_elem_bytes / (dispatch_elem_bytes + combine_elem_bytes)
        dispatch, combine = wire * share + latency, wire * (1 - share) + latency
        paired = paired_layer_s(attn_l, mlp_l, dispatch, combine)
        t_step = (layers - moe) * (attn_l + mlp_l) + moe * paired
    else:
        t_step = max(t_work, t_comm)
    compute = t_attn_c + t_mlp_c >= t_attn_m + t_mlp_m
    bound = "interconnect" if t_comm > t_work else ("compute" if compute else "memory")
    return EPStep(t_step * imbalance + layers * layer_overhead_s, bound, t_comm)
