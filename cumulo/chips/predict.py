"""Roofline performance model: tokens/s, TTFT, TPOT, sequences that fit, joules and dollars per token.

Each step (a prefill over the batch's prompts, or one decode step over the batch) takes the longer of its compute
time (FLOPs / peak for the format) and its memory time (weights + KV cache + activations / bandwidth), plus a
per-operation overhead where the chip has one, plus the interconnect term when several chips share the model.
A format the chip cannot multiply natively is emulated: weights move at their compact size and are dequantized
to the chip's compute dtype (bf16 where it has one, else fp32), costing `dequant_ops_per_weight` ALU operations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cumulo.chips.catalog import Chip, get_chip
from cumulo.chips.expert_parallel import EPLayout, Rates, alltoall_plan, ep_step, weight_bytes_per_chip
from cumulo.chips.measured import rate_at, skinny_curve
from cumulo.chips.presets import ModelShape, resolve_model
from cumulo.chips.weight_formats import COMPUTE_DTYPE_BITS, WeightFormat, get_format
from cumulo.errors import InvalidRequest
from cumulo.models.config import ModelConfig

EMULATION_MODES = ("fused", "dequant-at-load", "dequant-per-step")


@dataclass(frozen=True, slots=True)
class Assumptions:
    """Every knob of the model that is a judgement rather than a chip figure. Documented in docs/chips.md."""

    compute_efficiency: float = 0.6  # share of vendor peak FLOPS that real kernels reach
    bandwidth_efficiency: float = 0.8  # share of vendor peak memory bandwidth that real kernels reach
    interconnect_efficiency: float = 0.7
    collective_latency_s: float = 10e-6  # per all-reduce or pipeline hop
    memory_reserve: float = 0.10  # memory kept back for runtime, activations, fragmentation
    dequant_ops_per_weight: float = 4.0  # unpack, scale, convert: ALU ops per weight when emulating
    ops_per_layer: int = 14  # kernels/ops launched per decoder layer (for per-op overhead)
    # Decode steps of at most this many sequences replay a recorded graph (an engine's CUDA graphs, Cumulo's
    # CPU decode graph): their ops cost the chip's graph_op_latency_us (0 where it has none), not op_latency_us.
    graph_max_batch: int = 0
    step_overhead_s: float = 0.0  # serving software per step (scheduling, sampling); 0 = not modelled
    seq_overhead_s: float = 0.0  # serving software per sequence in a decode step (sampling, bookkeeping)
    prefill_seq_overhead_s: float = (
        0.0  # serving software per prompt in a prefill (per-sequence attention calls)
    )
    prefill_token_overhead_s: float = 0.0  # ... and per prompt token (masks, per-sequence attention glue)
    max_step_tokens: int = 0  # an engine's token budget per step: prefills split into steps (0 = one pass)
    activation_passes: int = 10  # activation reads+writes per layer per token (norms, residuals, glue)
    # Expert parallelism at serving scale (expert_parallel.py), both calibrated once on CloudMatrix-Infer's
    # 50 ms and 15 ms decode rows (docs/chips.md) and applied to every chip:
    layer_overhead_s: float = 100e-6  # fixed cost per decoder layer per step (synchronisation, launches)
    ep_imbalance: float = 1.8  # step time over the balanced roofline: the slowest chip sets the pace
    usd_per_kwh: float = 0.10
    pue: float = 1.3  # data-centre overhead on chip power
    lifetime_years: float = 4.0
    utilization: float = 0.7  # share of the lifetime spent serving


DEFAULT_ASSUMPTIONS = Assumptions()


@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    chip: str
    format: str
    batch: int
    context: int
    n_chips: int
    parallel: str
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    tpot_s: float
    max_sequences: int
    joules_per_token: float | None
    usd_per_million_tokens: float | None
    bound: str  # decode: "compute" | "memory" | "overhead" | "interconnect"
    prefill_bound: str
    native: bool
    compute_dtype: str
    bits_per_weight: float
    weights_gb: float  # the whole model, stored once
    total_params: float
    active_params: float  # multiplied per token: the dense part plus k routed experts (the LM head included)
    weights_gb_per_chip: float  # what each chip holds (expert parallelism: dense replicated, experts split)
    kv_gb_per_sequence: float
    fits: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True, slots=True)
class _Step:
    seconds: float
    bound: str


# Where an emulated format is multiplied, best first: a native dtype that holds its values exactly.
EMULATION_HOSTS: dict[str | None, tuple[str, ...]] = {
    "fp4": ("fp8", "bf16", "fp32"),  # E2M1 values are a subset of E4M3's
    "fp8": ("bf16", "fp32"),
    "int8": ("bf16", "fp32"),  # bf16 holds every int8 exactly
    "bf16": ("fp32",),
    None: ("bf16", "fp32"),  # GGUF blocks
}


def _compute_plan(chip: Chip, fmt: WeightFormat, prefer: str | None = None) -> tuple[bool, str, float]:
    """(native?, compute dtype name, peak FLOP/s) for multiplying weights of `fmt` on `chip`.

    `prefer` forces the dtype an emulated format is expanded into (an engine's choice, e.g. fp32 on CPUs).
    """
    if fmt.compute and fmt.name in chip.native and chip.get(_peak_key(fmt.compute)):
        return True, fmt.compute, chip.get(_peak_key(fmt.compute)) * 1e12  # type: ignore[operator]
    hosts = (prefer,) if prefer else EMULATION_HOSTS.get(fmt.compute, ("bf16", "fp32"))
    for dtype in hosts:
        peak = chip.get(_peak_key(dtype))
        if peak and (dtype in chip.native or dtype == "fp32"):
            return False, dtype, peak * 1e12
    raise InvalidRequest(
        f"chip '{chip.id}' has no published throughput to compute {fmt.name} in {prefer or 'bf16/fp32'}"
    )


def _peak_key(compute: str) -> str:
    return "int8_tops" if compute == "int8" else f"{compute}_tflops"


def _op_latency_s(chip: Chip, graphed: bool) -> float:
    key = "graph_op_latency_us" if graphed else "op_latency_us"
    return (chip.get(key) or 0.0) * 1e-6


def _efficiencies(chip: Chip, a: Assumptions) -> tuple[float, float]:
    """Achievable share of peak FLOPs and of memory bandwidth: 1 for achieved-rate entries, the chip's measured
    utilisation where the catalog has one, else the assumption."""
    if chip.achieved:
        return 1.0, 1.0
    return (
        chip.get("compute_utilization") or a.compute_efficiency,
        chip.get("bandwidth_utilization") or a.bandwidth_efficiency,
    )


def _time(
    chip: Chip,
    flops: float,
    bytes_moved: float,
    ops: float,
    peak: float,
    a: Assumptions,
    graphed: bool = False,
) -> _Step:
    c_eff, b_eff = _efficiencies(chip, a)
    bw = (chip.memory_bandwidth_gbs or 0.0) * 1e9 * b_eff
    if bw <= 0:
        raise InvalidRequest(f"chip '{chip.id}' has no published memory bandwidth; cannot predict")
    t_compute = flops / (peak * c_eff)
    t_memory = bytes_moved / bw
    t_overhead = ops * _op_latency_s(chip, graphed)
    bound = "compute" if t_compute >= t_memory else "memory"
    if t_overhead > max(t_compute, t_memory):
        bound = "overhead"
    return _Step(max(t_compute, t_memory) + t_overhead, bound)


def predict(
    model: str | ModelConfig | ModelShape,
    format: str,
    chip: str | Chip,
    batch: int = 1,
    context: int = 1024,
    n_chips: int = 1,
    parallel: str = "tp",
    emulation: str = "fused",
    compute_dtype: str | None = None,
    assumptions: Assumptions = DEFAULT_ASSUMPTIONS,
    redundant_experts: int = 0,
    mtp_tokens: int = 0,
    mtp_acceptance: float = 0.0,
    cached_context: int = 0,
) -> Prediction:
    """Predict serving `batch` sequences of `context` tokens (prompt length = KV length per sequence).

    TTFT is the prefill of the whole batch (all prompts arrive together); TPOT is one decode step at full
    context. Several chips split the weights: "tp" adds two all-reduces per layer, "pp" pipelines microbatches,
    "ep" (mixture-of-experts models) replicates attention and dense parts on every chip, spreads the routed
    experts (plus `redundant_experts` copies) over the chips and moves tokens to them and back each MoE layer
    (expert_parallel.py). `mtp_tokens` draft tokens per step (DeepSeek's multi-token prediction), accepted with
    probability `mtp_acceptance`, make each decode step verify 1 + mtp_tokens tokens per sequence.
    `cached_context` (expert parallelism only) is the prefix of each prompt already in the prefix cache: prefill
    computes the other `context - cached_context` tokens, which still attend over the cached ones, and
    `prefill_tok_s` counts computed tokens.
    A rack entry (kind "rack") is treated as one device with its aggregate figures: an upper bound.
    """
    shape, c, fmt, a = resolve_model(model), get_chip(chip), get_format(format), assumptions
    if batch < 1 or context < 1 or n_chips < 1:
        raise InvalidRequest("batch, context and n_chips must be at least 1")
    if parallel not in ("tp", "pp", "ep"):
        raise InvalidRequest("parallel must be 'tp', 'pp' or 'ep'")
    if parallel == "ep" and not shape.num_experts:
        raise InvalidRequest(f"expert parallelism needs a mixture-of-experts model; {shape.name} is dense")
    if mtp_tokens < 0 or not 0.0 <= mtp_acceptance <= 1.0 or redundant_experts < 0:
        raise InvalidRequest("mtp_tokens and redundant_experts must be >= 0, mtp_acceptance within [0, 1]")
    if not 0 <= cached_context < context or (cached_context and parallel != "ep"):
        raise InvalidRequest("cached_context must be within [0, context) and is modelled under parallel='ep'")
    if emulation not in EMULATION_MODES:
        raise InvalidRequest(f"emulation must be one of {', '.join(EMULATION_MODES)}")
    native, dtype, peak = _compute_plan(c, fmt, compute_dtype)
    act_bytes = 4 if dtype == "fp32" else 2  # activations between matmuls stay in bf16 (fp32 on fp32 chips)
    kv_bytes = act_bytes  # KV cache kept in the activation dtype
    w_bytes = fmt.bits_per_weight / 8
    notes: list[str] = []
    deq_ops = 0.0
    if not native:
        notes.append(f"{fmt.name} is not native on {c.id}: emulated ({emulation}), computing in {dtype}")
        deq_ops = a.dequant_ops_per_weight
        if emulation == "dequant-at-load":
            w_bytes, deq_ops = COMPUTE_DTYPE_BITS[dtype] / 8, 0.0
    # dequant-per-step writes the expanded weights and reads them back for the matmul.
    extra_w_bytes = (
        COMPUTE_DTYPE_BITS[dtype] / 8 * 2 if (not native and emulation == "dequant-per-step") else 0
    )
    fp32_peak = (c.get("fp32_tflops") or c.get("bf16_tflops") or 0) * 1e12
    n = n_chips
    shard = 1.0 / n  # each chip holds and streams this share of the weights and KV

    # A calibrated host multiplies fp32/bf16 weights at the rate it measured for that many rows, in sequence with
    # everything else (a CPU overlaps little); this replaces the two straight lines of the roofline.
    curve = skinny_curve(c, dtype, c.get(f"{dtype}_tflops")) if dtype in ("fp32", "bf16") else []
    # A curve measured for this very format (Cumulo's packed linear on this host) already holds its
    # dequantization or fused-kernel cost, so it replaces both the dtype curve and the dequant traffic.
    format_curve = skinny_curve(c, fmt.name) if not native else []
    if not native and emulation == "fused" and not format_curve:
        curve = []  # a fused kernel on packed weights: the fp32/bf16 curve says nothing about it
    bw_local = (c.memory_bandwidth_gbs or 0.0) * 1e9

    # The LM head (and an untied embedding) stay in 16 bits when the body is quantized, as Cumulo's
    # QuantPolicy and DeepSeek's FP8 checkpoints do; they never go below the activation dtype's width.
    head_bytes = max(act_bytes, w_bytes)
    if parallel == "ep":
        layout = EPLayout(n_chips, redundant_experts)
        return _predict_ep(
            shape, c, fmt.name, native, dtype, peak, layout, batch, context, a, notes,
            w_bytes, head_bytes, act_bytes, mtp_tokens, mtp_acceptance, fmt.bits_per_weight, cached_context,
        )  # fmt: skip

    def step(
        tokens: int, kv_tokens_read: float, attn_ctx_tokens: float, kv_tokens_written: float, logits: int,
        graphed: bool = False,
    ) -> _Step:  # fmt: skip
        weights = shape.weights_read(tokens) - shape.head_params  # the quantized body
        # The LM head runs only for tokens that sample (the last of each prompt in prefill).
        matmul_flops = 2 * (shape.active_params - shape.head_params) * tokens + 2 * shape.head_params * logits
        attn_flops = shape.attn_flops_per_ctx * attn_ctx_tokens
        act = shape.num_layers * tokens * shape.hidden_size * act_bytes * a.activation_passes
        other_bytes = (kv_tokens_read + kv_tokens_written) * shape.kv_elems_per_token * kv_bytes + act
        if curve and bw_local > 0:
            return _curve_step(weights, tokens, logits, other_bytes, attn_flops, graphed)
        flops = matmul_flops + attn_flops
        moved = weights * (w_bytes + extra_w_bytes) + shape.head_params * head_bytes + other_bytes
        st = _time(c, flops * shard, moved * shard, shape.num_layers * a.ops_per_layer, peak, a, graphed)
        if deq_ops and fp32_peak:
            # Dequantization runs on the ALUs alongside the matmul; it only shows when it is the longer task.
            t_deq = weights * shard * deq_ops / (fp32_peak * (1.0 if c.achieved else a.compute_efficiency))
            if t_deq > st.seconds:
                st = _Step(t_deq, "compute")
        return st

    def _curve_step(
        weights: float, tokens: int, logits: int, other_bytes: float, other_flops: float, graphed: bool
    ) -> _Step:
        body_curve = format_curve or curve
        t_mm = 2 * weights * tokens / rate_at(body_curve, tokens) + 2 * shape.head_params * logits / rate_at(
            curve, logits
        )
        expanded = COMPUTE_DTYPE_BITS[dtype] / 8
        measured_format = bool(format_curve)
        t_deq = (
            0.0
            if native or measured_format or emulation == "dequant-at-load"
            else weights * (w_bytes + expanded) / bw_local
        )
        t_other = other_bytes / bw_local + other_flops / peak + t_deq
        t_ops = shape.num_layers * a.ops_per_layer * _op_latency_s(c, graphed)
        roof_compute = 2 * weights * tokens / peak >= weights * expanded / bw_local
        bound = "overhead" if t_ops > t_mm + t_other else ("compute" if roof_compute else "memory")
        return _Step((t_mm + t_other + t_ops) * shard, bound)

    def comm(tokens: int) -> float:
        if n == 1:
            return 0.0
        link = (c.get("interconnect_gbs") or 0.0) / 2 * 1e9 * a.interconnect_efficiency  # one direction
        if link <= 0:
            raise InvalidRequest(f"chip '{c.id}' has no published chip-to-chip bandwidth; use n_chips=1")
        size = tokens * shape.hidden_size * act_bytes
        if parallel == "tp":  # ring all-reduce after attention and after the MLP, every layer
            return shape.num_layers * 2 * (2 * (n - 1) / n * size / link + a.collective_latency_s)
        return (n - 1) * (size / link + a.collective_latency_s)  # pp: one activation hop per stage boundary

    # Prefill: every prompt in one pass, or in steps of an engine's token budget (each its own step, paying the
    # step overhead); causal attention touches context/2 cached tokens on average.
    tokens_p = batch * context
    n_pre = math.ceil(tokens_p / a.max_step_tokens) if a.max_step_tokens else 1
    per = math.ceil(tokens_p / n_pre)
    pre = step(per, 0, batch * context * context / 2 / n_pre, per, math.ceil(batch / n_pre))
    t_pre = (
        n_pre * (pre.seconds + a.step_overhead_s)
        + comm(tokens_p)
        + batch * a.prefill_seq_overhead_s
        + tokens_p * a.prefill_token_overhead_s
    )
    # Decode: one token per sequence, reading every sequence's KV.
    if parallel == "pp" and n > 1:
        # n microbatches in flight: a token of every sequence needs each stage to run n microbatches.
        micro = math.ceil(batch / n)
        dec = step(micro, micro * context, micro * context, micro, micro, micro <= a.graph_max_batch)
        t_work, t_comm = n * (dec.seconds + a.step_overhead_s + micro * a.seq_overhead_s), comm(micro)
    else:
        dec = step(batch, batch * context, batch * context, batch, batch, batch <= a.graph_max_batch)
        t_work, t_comm = dec.seconds + a.step_overhead_s + batch * a.seq_overhead_s, comm(batch)
    t_dec = t_work + t_comm
    bound = "interconnect" if t_comm > t_work else dec.bound

    body = shape.total_params - shape.head_params - shape.embed_params
    weights_total = body * w_bytes + (shape.head_params + shape.embed_params) * head_bytes
    kv_seq = context * shape.kv_elems_per_token * kv_bytes
    mem = (c.memory_gb or 0.0) * 1e9 * n * (1 - a.memory_reserve)
    free = mem - weights_total
    max_seq = int(free // kv_seq) if free > 0 else 0
    fits = max_seq >= batch
    if free <= 0:
        notes.append(f"weights ({weights_total / 1e9:.1f} GB) do not fit in {mem / 1e9:.1f} GB usable memory")
    elif not fits:
        notes.append(f"batch {batch} exceeds the {max_seq} sequences that fit at context {context}")
    if c.kind == "rack":
        notes.append("rack treated as one device with aggregate figures (upper bound)")

    decode_tok_s = batch / t_dec
    power = None if c.power_w is None else c.power_w * n
    joules = None if power is None else power * t_dec / batch
    usd = _usd_per_million(c.get("price_usd"), power, n, decode_tok_s, a)
    return Prediction(
        model=shape.name,
        chip=c.id,
        format=fmt.name,
        batch=batch,
        context=context,
        n_chips=n,
        parallel=parallel,
        prefill_tok_s=tokens_p / t_pre,
        decode_tok_s=decode_tok_s,
        ttft_s=t_pre,
        tpot_s=t_dec,
        max_sequences=max_seq,
        joules_per_token=joules,
        usd_per_million_tokens=usd,
        bound=bound,
        prefill_bound=pre.bound,
        native=native,
        compute_dtype=dtype,
        bits_per_weight=fmt.bits_per_weight,
        weights_gb=weights_total / 1e9,
        total_params=shape.total_params,
        active_params=shape.active_params,
        weights_gb_per_chip=weights_total / n / 1e9,
        kv_gb_per_sequence=kv_seq / 1e9,
        fits=fits,
        notes=tuple(notes),
    )


def _usd_per_million(
    price: float | None, power_w: float | None, units: int, tok_s: float, a: Assumptions
) -> float | None:
    """Hardware amortised over its serving hours plus electricity (with PUE), per million output tokens."""
    if price is None or tok_s <= 0:
        return None
    hours = a.lifetime_years * 365 * 24 * a.utilization
    per_hour = price * units / hours + (power_w or 0.0) / 1000 * a.pue * a.usd_per_kwh
    return per_hour / (tok_s * 3600) * 1e6


def _predict_ep(
    shape: ModelShape,
    c: Chip,
    fmt_name: str,
    native: bool,
    dtype: str,
    peak: float,
    layout: EPLayout,
    batch: int,
    context: int,
    a: Assumptions,
    notes: list[str],
    w_bytes: float,
    head_bytes: float,
    kv_b: int,
    mtp: int,
    acceptance: float,
    bits: float,
    cached: int,
) -> Prediction:
    """Expert parallelism over `layout.n_chips` chips; `batch` sequences spread evenly over them."""
    n = layout.n_chips
    c_eff, b_eff = _efficiencies(c, a)
    bw = (c.memory_bandwidth_gbs or 0.0) * 1e9
    if bw <= 0:
        raise InvalidRequest(f"chip '{c.id}' has no published memory bandwidth; cannot predict")
    # Attention's core runs in bf16 whatever the weight format (DeepSeek: "BF16 for core MLA computation").
    attn_peak = (c.get("bf16_tflops") or 0.0) * 1e12 or peak
    rates = Rates(peak * c_eff, attn_peak * c_eff, bw * b_eff)
    # Prefill's GEMMs (thousands of rows) run at the chip's measured GEMM utilisation at those shapes where it has
    # one (DeepGEMM on H800). Decode's few-row GEMMs are bounded by their bytes and keep the kernels' figure.
    rates_pre = Rates(peak * (c.get("gemm_utilization") or c_eff), attn_peak * c_eff, bw * b_eff)
    plan = {"interconnect_efficiency": a.interconnect_efficiency, "latency_s": a.collective_latency_s}
    a2a_pre = alltoall_plan(c, shape, n, prefill=True, **plan)
    a2a_dec = alltoall_plan(c, shape, n, prefill=False, **plan)
    small = 1 if dtype in ("fp8", "int8") else kv_b  # DeepSeek dispatches in FP8, CloudMatrix in INT8
    kv_tok = shape.kv_elems_per_token * kv_b
    act_tok = shape.num_layers * shape.hidden_size * kv_b * a.activation_passes
    seqs = batch / n
    common = {"w_bytes": w_bytes, "head_bytes": head_bytes, "dispatch_elem_bytes": small}
    common |= {
        "combine_elem_bytes": kv_b,
        "layer_overhead_s": a.layer_overhead_s,
        "imbalance": a.ep_imbalance,
    }
    # Prefill: each chip runs its prompts in one pass, two micro-batches. A computed token attends over the cached
    # prefix and, causally, half the computed part on average; MLA expands each cached latent once per prompt.
    new = context - cached
    p_tok = seqs * new
    pre_ctx = shape.prefill_attn_flops_per_ctx or shape.attn_flops_per_ctx
    pre = ep_step(
        shape, layout, rates_pre, a2a_pre, tokens=p_tok, attn_flops=pre_ctx * p_tok * (cached + new / 2),
        kv_bytes=seqs * context * kv_tok, act_bytes_moved=p_tok * act_tok, logits=seqs,
        expand_flops=2 * shape.latent_expand_params * seqs * cached, micro_batches=2, **common,
    )  # fmt: skip
    # Decode: each sequence verifies 1 + mtp tokens against its whole cache, which is read once.
    d_tok = seqs * (1 + mtp)
    dec = ep_step(
        shape, layout, rates, a2a_dec, tokens=d_tok, attn_flops=shape.attn_flops_per_ctx * d_tok * context,
        kv_bytes=(seqs * context + d_tok) * kv_tok, act_bytes_moved=d_tok * act_tok, logits=d_tok,
        extra_layers=mtp, **common,
    )  # fmt: skip
    per_step = 1.0 + mtp * acceptance  # tokens a sequence gains per decode step
    t_dec = dec.seconds + a.step_overhead_s + seqs * a.seq_overhead_s
    per_chip = weight_bytes_per_chip(shape, layout, w_bytes, head_bytes)
    kv_seq = context * kv_tok
    mem = (c.memory_gb or 0.0) * 1e9 * (1 - a.memory_reserve)
    free = mem - per_chip
    max_seq = int(free // kv_seq) * n if free > 0 else 0
    if free <= 0:
        notes.append(
            f"weights per chip ({per_chip / 1e9:.1f} GB) do not fit in {mem / 1e9:.1f} GB usable memory"
        )
    elif max_seq < batch:
        notes.append(f"batch {batch} exceeds the {max_seq} sequences that fit at context {context}")
    if n > 1:
        for phase, a2a in (("prefill", a2a_pre), ("decode", a2a_dec)):
            links = ", ".join(
                f"{copies:.1f} copies/token at {rate / 1e9:.0f} GB/s" for copies, rate in a2a.links
            )
            notes.append(f"{phase}: expert-parallel all-to-all over {n} chips, {a2a.kernel} ({links})")
    decode_tok_s = batch * per_step / t_dec
    power = None if c.power_w is None else c.power_w * n
    body = shape.total_params - shape.head_params - shape.embed_params
    return Prediction(
        model=shape.name,
        chip=c.id,
        format=fmt_name,
        batch=batch,
        context=context,
        n_chips=n,
        parallel="ep",
        prefill_tok_s=batch * new / pre.seconds,
        decode_tok_s=decode_tok_s,
        ttft_s=pre.seconds,
        tpot_s=t_dec / per_step,
        max_sequences=max_seq,
        joules_per_token=None if power is None else power * t_dec / (batch * per_step),
        usd_per_million_tokens=_usd_per_million(c.get("price_usd"), power, n, decode_tok_s, a),
        bound=dec.bound,
        prefill_bound=pre.bound,
        native=native,
        compute_dtype=dtype,
        bits_per_weight=bits,
        weights_gb=(body * w_bytes + (shape.head_params + shape.embed_params) * head_bytes) / 1e9,
        total_params=shape.total_params,
        active_params=shape.active_params,
        weights_gb_per_chip=per_chip / 1e9,
        kv_gb_per_sequence=kv_seq / 1e9,
        fits=max_seq >= batch,
        notes=tuple(notes),
    )
