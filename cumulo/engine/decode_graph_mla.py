"""The recorded decode step of a DeepSeek-V3 model (multi-head latent attention, dense first layers, then MoE
with shared experts and DeepSeek's sigmoid router), for `cumulo.engine.decode_graph.DecodeGraph.record`.

Per layer, in the order the eager layers compute (so every rounding falls where eager's does):
  q_a_proj -> q_a_layernorm -> q_b_proj (or q_proj) into q [B, H, nope + rope]; kv_a_proj_with_mqa into
  kv [B, rank + rope]; `mla_rope_cache` (q_pe rotated, normalised latent + rotated k_pe cached); `mla_decode`
  (the absorbed form, W_UK/W_UV from `MLAttention._absorb`); o_proj; x += o, h = norm(x);
  dense: gate_up -> silu_mul -> down into d; MoE: shared experts into d2, the router's fp32 logits, routing and
  experts in the grouped kernel's one call into d, d += d2; x += d, h = next norm(x).
`record_mla` answers None for anything it cannot record (the engine then decodes eagerly): never a wrong step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cumulo.engine.lora import MultiLoRALinear
from cumulo.formats.kernels.cpu import kernel_threads
from cumulo.formats.kernels.moe import ERRORS as MOE_ERRORS
from cumulo.formats.kernels.moe import SIGMOID
from cumulo.models.attention import KVCache
from cumulo.models.deepseek import DeepseekMoE
from cumulo.models.layers import GatedMLP, RMSNorm
from cumulo.models.mla import MLAttention

MAX_ROPE = 1024  # the MLA write kernel's widest rotary part (graph.MLA_ERRORS)


def _silu(mlp: nn.Module | None) -> bool:
    """A SiLU-gated MLP (what the graph's silu_mul op computes)."""
    return isinstance(mlp, GatedMLP) and mlp.act == "silu"


def _mla_layer(layer: nn.Module, dtype: torch.dtype, kv_cache: KVCache) -> bool:
    """Whether this decoder layer is DeepSeek's kind with tables and a cache the MLA ops take."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = {name for name, _ in layer.named_children()}
    if names != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
        return False
    if not isinstance(attn, MLAttention) or not all(
        type(n) is RMSNorm and not n.offset for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ):
        return False
    cos, sin = attn.rotary.cos, attn.rotary.sin
    cache = kv_cache.latent[attn.layer_idx] if attn.layer_idx < len(kv_cache.latent) else None
    return (
        cos.dtype == torch.float32  # the write kernel reads fp32 tables
        and sin.dtype == torch.float32
        and cos.is_contiguous()
        and sin.is_contiguous()
        and cos.shape[1] * 2 == attn.rope
        and 0 < attn.rope <= MAX_ROPE
        and cache is not None
        and cache.dtype == dtype
        and cache.is_contiguous()
        and cache.shape[-1] == attn.rank + attn.rope
        and (
            _silu(mlp)
            or (
                isinstance(mlp, DeepseekMoE)
                and (mlp.shared_experts is None or _silu(mlp.shared_experts))
                and mlp.experts.grouped
                and mlp.experts.grouped_kernel() is not None
            )
        )
    )


def record_linear(g: Any, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Record `module`'s own graph op from x into y, keeping the three alive with the graph; False where it has
    none (the caller then answers None: the step stays eager)."""
    op = getattr(module, "graph_op", None)
    recorded = op(x, y) if op is not None else None
    if recorded is not None:
        g.keep(module, x, y)
        g.add(recorded)
    return recorded is not None


def record_mla(
    model: nn.Module,
    kv_cache: KVCache,
    batch: int,
    recorder: type,
    max_blocks: int | None,
    lora: bool = False,
) -> tuple[Any, dict[str, torch.Tensor], tuple[str, ...]] | None:
    """(graph, buffers, LoRA linears' names) of one decode step of `batch` rows of a DeepSeek model over its
    latent cache, or None; called by `DecodeGraph.record` once its checks common to both walks (batch size, a
    LlamaModel body with an RMSNorm at the end, the dtype, a recorder with a LoRA op if asked) have passed.
    `lora`: each multi-LoRA linear is followed by the recorder's LoRA op, as in `DecodeGraph.record`'s walk
    (None if the model has no such linear)."""
    body = model.model
    layers, embed, final_norm = body.layers, body.embed_tokens, body.norm
    dtype = embed.weight.dtype
    if not all(hasattr(recorder, op) for op in ("mla_decode", "mla_rope_cache", "linear")) or not all(
        _mla_layer(layer, dtype, kv_cache) for layer in layers
    ):
        return None
    lora_names = tuple(
        m.name for layer in layers for m in layer.modules() if lora and isinstance(m, MultiLoRALinear)
    )
    if lora and not lora_names:
        return None

    def buf(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dt)

    hidden = embed.weight.shape[1]
    b = {
        "ids": buf(batch, dt=torch.int64), "positions": buf(batch, dt=torch.int64),
        "slots": buf(batch, dt=torch.int64), "lens": buf(batch, dt=torch.int64),
        "tables": buf(batch, max_blocks or kv_cache.num_blocks, dt=torch.int64),
        "x": buf(batch, hidden), "h": buf(batch, hidden), "o": buf(batch, hidden), "d": buf(batch, hidden),
        "d2": buf(batch, hidden), "scratch": buf(batch, hidden),
        "lora": buf(len(lora_names), batch, 3, dt=torch.int64),  # per linear, per row: (A, Bt, R) (lora.py)
    }  # fmt: skip
    # scratch by (use, shape, dtype): layers of one shape share it, dense and shared-expert MLPs differ in width
    sized: dict[tuple[object, ...], torch.Tensor] = {}

    def width(name: str, *shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        key = (name, *shape, dt)
        if key not in sized:
            sized[key] = buf(batch, *shape, dt=dt)
        return sized[key]

    g = recorder()
    threads = torch.get_num_threads()

    def linear(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
        if not record_linear(g, module, x, y):
            return False
        if lora and isinstance(module, MultiLoRALinear):  # one thread, as DecodeGraph.record says why
            g.lora(x, y, b["lora"][lora_names.index(module.name)], 1)
        return True

    def norm(n: RMSNorm, x: torch.Tensor, y: torch.Tensor) -> None:
        g.rms_norm(x=x, weight=n.weight.detach().to(dtype).contiguous(), y=y, eps=n.eps, offset=n.offset)

    def add_norm(x: torch.Tensor, r: torch.Tensor, n: RMSNorm, y: torch.Tensor) -> None:  # x += r; y = n(x)
        g.add_rms_norm(
            x=x, r=r, weight=n.weight.detach().to(dtype).contiguous(), y=y, eps=n.eps, offset=n.offset
        )

    def gated(mlp: GatedMLP, out: torch.Tensor) -> bool:  # out = down(silu(gate) * up)(h)
        inter = mlp.down_proj.in_features
        gu, act = width("gu", 2 * inter), width("act", inter)
        if not linear(mlp.gate_up_proj, b["h"], gu):
            return False
        g.silu_mul(gate_up=gu, act=act)
        return linear(mlp.down_proj, act, out)

    norm(layers[0].input_layernorm, b["x"], b["h"])
    ones = torch.ones(hidden, dtype=dtype)  # d += d2 rides on add_rms_norm; its normalised output is dropped
    for i, layer in enumerate(layers):
        attn: MLAttention = layer.self_attn
        heads, qk, rank, rope = attn.num_heads, attn.nope + attn.rope, attn.rank, attn.rope
        q = width("q", heads, qk)  # [B, H, nope + rope]
        kv = width("kv", rank + rope)  # [B, rank + rope]
        if attn.q_lora_rank:
            qa, qn = width("qa", attn.q_lora_rank), width("qn", attn.q_lora_rank)
            if not linear(attn.q_a_proj, b["h"], qa):
                return None
            norm(attn.q_a_layernorm, qa, qn)
            if not linear(attn.q_b_proj, qn, q.view(batch, heads * qk)):
                return None
        elif not linear(attn.q_proj, b["h"], q.view(batch, heads * qk)):
            return None
        if not linear(attn.kv_a_proj_with_mqa, b["h"], kv):
            return None
        cache = kv_cache.latent[attn.layer_idx]
        kv_norm = attn.kv_a_layernorm
        g.mla_rope_cache(q=q, kv=kv, weight=kv_norm.weight.detach().to(dtype).contiguous(), eps=kv_norm.eps,
                         positions=b["positions"], cos=attn.rotary.cos, sin=attn.rotary.sin, cache=cache,
                         slots=b["slots"], interleaved=attn.rotary.interleaved)  # fmt: skip
        w_uk, w_uv = attn._absorb(dtype)  # kept by the graph: a new kv_b_proj or dtype makes new ones eagerly
        out = width("attn", heads, attn.v_dim)  # [B, H, v]
        g.mla_decode(q=q, w_uk=w_uk, w_uv=w_uv, cache=cache, tables=b["tables"], lens=b["lens"], out=out,
                     scale=attn.scale, threads=threads)  # fmt: skip
        if not linear(attn.o_proj, out.view(batch, heads * attn.v_dim), b["o"]):
            return None
        add_norm(b["x"], b["o"], layer.post_attention_layernorm, b["h"])
        mlp = layer.mlp
        if isinstance(mlp, GatedMLP):
            if not gated(mlp, b["d"]):
                return None
        else:
            if not _moe(g, mlp, b, width):
                return None
            if mlp.shared_experts is not None:
                if not gated(mlp.shared_experts, b["d2"]):
                    return None
                g.add_rms_norm(x=b["d"], r=b["d2"], weight=ones, y=b["scratch"], eps=1e-6, offset=0.0)
        add_norm(b["x"], b["d"], layers[i + 1].input_layernorm if i + 1 < len(layers) else final_norm, b["h"])
    b["embed"] = embed.weight
    return g, b, lora_names


def _moe(g: Any, mlp: DeepseekMoE, b: dict[str, torch.Tensor], width: Any) -> bool:
    """d = the routed experts of h: the router's fp32 logits, then sigmoid routing and the selected experts in
    the grouped kernel's one call (as `Experts.sigmoid_routed`). False where either cannot be recorded (e.g. a
    router whose weight is not in the activations' dtype)."""
    router, kernel = mlp.gate, mlp.experts.grouped_kernel()
    assert kernel is not None
    experts, k = kernel.num_experts, router.top_k
    logits = width("logits", experts, dt=torch.float32)
    ids, weights = width("expert_ids", k, dt=torch.int64), width("expert_weights", k, dt=torch.float32)
    if not g.linear(b["h"], router.weight.detach(), logits):
        return False
    bias = router.e_score_correction_bias.detach().float().contiguous()
    op = kernel.graph_op(b["h"], logits, ids, weights, b["d"], k, router.norm_topk_prob, kernel_threads(), router=SIGMOID,
                         bias=bias, n_group=router.n_group, topk_group=router.topk_group,
                         scale=router.routed_scaling_factor)  # fmt: skip
    if op is None:
        return False
    g.keep(mlp.experts, kernel, logits, ids, weights, bias)
    g.add(op, MOE_ERRORS)
    return True
