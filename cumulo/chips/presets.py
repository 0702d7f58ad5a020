"""Model shapes for the performance model: architecture presets, and the shape of any `ModelConfig`.

A `ModelShape` holds only what a roofline needs: weights stored and multiplied per token, KV-cache elements per
token, attention FLOPs per cached token, and for mixture-of-experts models the routed-expert share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cumulo.errors import InvalidModel, ModelNotFound
from cumulo.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    total_params: float  # every weight stored (embeddings included, a tied head once)
    active_params: float  # weights multiplied per token: layers + LM head (routed experts: only k of E)
    num_layers: int
    hidden_size: int
    kv_elems_per_token: float  # cached elements per token over all layers (K and V, or MLA's latent)
    attn_flops_per_ctx: float  # FLOPs per new token per cached token, all layers (QK^T and AV)
    head_params: float = 0.0  # LM head (multiplied every token); kept in 16 bits by Cumulo and DeepSeek
    embed_params: float = 0.0  # input embedding stored apart from the head (0 when tied); rows are looked up
    expert_params: float = 0.0  # routed-expert weights, all experts, all layers
    num_experts: int = 0
    experts_per_token: int = 0
    moe_layers: int = 0  # layers whose MLP is routed experts (an all-to-all each under expert parallelism)
    expert_groups: int = 1  # group-limited routing (DeepSeek-V3): experts in this many groups ...
    groups_per_token: int = 1  # ... of which a token may use the best this many (node-limited routing)
    # Prefill attention FLOPs per new token per cached token where prefill computes attention another way than
    # decode (MLA: expanded heads of 192/128 dims in prefill, the absorbed 576/512-dim latent form in decode).
    prefill_attn_flops_per_ctx: float | None = None
    attn_params: float = (
        0.0  # attention projections over all layers (the rest of the body is MLPs and router)
    )
    # MLA's up-projection of the cached latent to expanded keys and values (kv_b_proj), all layers: what a prefill
    # in the expanded form multiplies for every cached prefix token it attends over (0 without MLA).
    latent_expand_params: float = 0.0

    @property
    def dense_params(self) -> float:
        """Weights every token multiplies that are not routed experts: attention, dense and shared MLPs, head."""
        share = self.experts_per_token / self.num_experts if self.num_experts else 0.0
        return self.active_params - self.expert_params * share

    @property
    def expert_size(self) -> float:
        """Weights of one routed expert over all MoE layers."""
        return self.expert_params / self.num_experts if self.num_experts else 0.0

    def weights_read(self, tokens: int) -> float:
        """Weights touched by one step over `tokens` tokens: dense part plus the experts those tokens hit.

        Routing is taken as uniform: a given expert is missed by all tokens with probability (1 - k/E)^tokens.
        """
        if not self.num_experts:
            return self.active_params
        share = self.experts_per_token / self.num_experts
        dense = self.active_params - self.expert_params * share
        return dense + self.expert_params * (1.0 - (1.0 - share) ** max(tokens, 1))


def shape_from_config(cfg: ModelConfig) -> ModelShape:
    """Count a decoder's weights from its config (biases and norms are too small to matter).

    Mixture-of-experts configs (`num_experts` > 0) count every routed expert as stored and k of them as
    multiplied; multi-head latent attention (`kv_lora_rank` > 0) caches the latent plus the rotary part.
    """
    h, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    if cfg.kv_lora_rank:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = h * heads * qk if not cfg.q_lora_rank else h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk
        kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        kv += cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        attn = q + kv + heads * cfg.v_head_dim * h
        kv_elems = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # the latent, not expanded K and V
        # Decode runs the absorbed form: per head, scores over latent + rope dims, values over the latent.
        attn_ctx = layers * 2 * heads * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.kv_lora_rank)
        prefill_ctx: float | None = layers * 2 * heads * (qk + cfg.v_head_dim)
    else:
        attn = h * heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
        kv_elems = 2 * layers * cfg.num_key_value_heads * hd
        attn_ctx, prefill_ctx = 4 * layers * heads * hd, None
    expand = layers * cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    moe = _moe_layer_count(cfg)
    expert = 3 * h * cfg.moe_intermediate_size
    routed = moe * cfg.num_experts * expert
    mlp = (layers - moe) * 3 * h * cfg.intermediate_size + moe * (
        cfg.num_shared_experts * expert + cfg.num_experts * h  # shared experts and the router
    )
    active_routed = moe * cfg.num_experts_per_tok * expert
    embed = cfg.vocab_size * h
    body = layers * attn + mlp
    return ModelShape(
        name=cfg.name or cfg.architecture,
        total_params=body + routed + embed + (0 if cfg.tie_word_embeddings else embed),
        active_params=body + active_routed + embed,  # the LM head is multiplied every token, tied or not
        num_layers=layers,
        hidden_size=h,
        kv_elems_per_token=kv_elems,
        attn_flops_per_ctx=attn_ctx,
        head_params=embed,
        embed_params=0 if cfg.tie_word_embeddings else embed,
        expert_params=routed,
        num_experts=cfg.num_experts if moe else 0,
        experts_per_token=cfg.num_experts_per_tok if moe else 0,
        moe_layers=moe,
        expert_groups=cfg.n_group if moe else 1,
        groups_per_token=cfg.topk_group if moe else 1,
        prefill_attn_flops_per_ctx=prefill_ctx,
        attn_params=layers * attn,
        latent_expand_params=expand,
    )


def _moe_layer_count(cfg: ModelConfig) -> int:
    """Layers with routed experts: DeepSeek's after `first_k_dense_replace`, Qwen3-MoE's every
    `decoder_sparse_step`-th except `mlp_only_layers`."""
    if not cfg.num_experts:
        return 0
    step = max(cfg.decoder_sparse_step, 1)
    return sum(
        1
        for i in range(cfg.num_hidden_layers)
        if i >= cfg.first_k_dense_replace and (i + 1) % step == 0 and i not in cfg.mlp_only_layers
    )


def _dense(name: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int) -> ModelShape:
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        name=name,
    )
    return shape_from_config(cfg)


def _deepseek_v3() -> ModelShape:
    # deepseek-ai/DeepSeek-V3 config.json: 61 layers (first 3 dense, intermediate 18432), hidden 7168, 256 routed
    # experts of 2048 with 8 active + 1 shared, MLA (q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128,
    # v 128, 128 heads), group-limited routing over 8 groups of which the best 4 are eligible. 671B total, 37B active (DeepSeek-V3 technical report, arXiv 2412.19437); the 14B of the
    # MTP module are not counted, as the report does not.
    return shape_from_config(
        ModelConfig(
            architecture="deepseek_v3",
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            num_hidden_layers=61,
            num_attention_heads=128,
            num_key_value_heads=128,
            head_dim=128,
            num_experts=256,
            num_experts_per_tok=8,
            moe_intermediate_size=2048,
            num_shared_experts=1,
            first_k_dense_replace=3,
            n_group=8,
            topk_group=4,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            name="deepseek-v3",
        )
    )


def _qwen3_30b_a3b() -> ModelShape:
    # Qwen/Qwen3-30B-A3B config.json: 48 layers, all MoE, hidden 2048, 128 experts of 768 with 8 active, no
    # shared expert, GQA 32 query / 4 KV heads of 128, vocab 151936, untied head. Qwen states 30.5B total and
    # 3.3B activated (model card; the embedding table counted), which these counts give.
    return shape_from_config(
        ModelConfig(
            architecture="qwen3_moe",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            norm_topk_prob=True,
            name="qwen3-30b-a3b",
        )
    )


PRESETS: dict[str, ModelShape] = {
    "llama-3.1-8b": _dense("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8),
    "llama-3.1-70b": _dense("llama-3.1-70b", 128256, 8192, 28672, 80, 64, 8),
    "qwen2.5-72b": _dense("qwen2.5-72b", 152064, 8192, 29568, 80, 64, 8),
    "smollm2-135m": shape_from_config(
        ModelConfig(
            architecture="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            tie_word_embeddings=True,
            name="smollm2-135m",
        )
    ),
    "deepseek-v3": _deepseek_v3(),
    "qwen3-30b-a3b": _qwen3_30b_a3b(),
}


def resolve_model(model: str | ModelConfig | ModelShape) -> ModelShape:
    """A preset name, a `ModelConfig`, a `ModelShape`, or a path/name the model loader understands."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, ModelConfig):
        return shape_from_config(model)
    key = str(model).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    try:
        from cumulo.models.loader import load_config  # written in parallel; optional here
    except ImportError as exc:
        if Path(str(model)).exists():
            raise InvalidModel(
                f"cannot read '{model}': the model loader (cumulo.models.loader) is not "
                "available in this build; use a preset"
            ) from exc
        raise ModelNotFound(f"unknown model '{model}'; presets: {', '.join(PRESETS)}") from exc
    try:
        cfg = load_config(str(model))
    except ModelNotFound as exc:
        raise ModelNotFound(f"{exc}; or use a preset: {', '.join(PRESETS)}") from exc
    return shape_from_config(cfg)
