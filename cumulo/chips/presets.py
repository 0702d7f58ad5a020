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
    """Count a dense decoder's weights from its config (biases and norms are too small to matter)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
    mlp = 3 * h * cfg.intermediate_size
    layers = cfg.num_hidden_layers * (attn + mlp)
    embed = cfg.vocab_size * h
    return ModelShape(
        name=cfg.name or cfg.architecture,
        total_params=layers + embed + (0 if cfg.tie_word_embeddings else embed),
        active_params=layers + embed,  # the LM head is multiplied every token, tied or not
        num_layers=cfg.num_hidden_layers,
        hidden_size=h,
        kv_elems_per_token=2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd,
        attn_flops_per_ctx=4 * cfg.num_hidden_layers * cfg.num_attention_heads * hd,
        head_params=embed,
        embed_params=0 if cfg.tie_word_embeddings else embed,
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
    # From the public config.json: 61 layers (3 dense, 58 MoE), hidden 7168, 256 routed experts of
    # intermediate 2048 with 8 active + 1 shared, MLA with a 512 latent + 64 RoPE dims cached per layer.
    layers, hidden, moe_layers = 61, 7168, 58
    expert = 3 * hidden * 2048
    # Absorbed MLA decode: per head QK^T over 576 dims and AV over 512 dims, 128 heads.
    attn = layers * 2 * 128 * (576 + 512)
    return ModelShape(
        name="deepseek-v3",
        total_params=671e9,
        active_params=37e9,
        num_layers=layers,
        hidden_size=hidden,
        kv_elems_per_token=layers * (512 + 64),
        attn_flops_per_ctx=attn,
        head_params=129280 * hidden,
        embed_params=129280 * hidden,
        expert_params=moe_layers * 256 * expert,
        num_experts=256,
        experts_per_token=8,
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
