"""Gemma 3 (text): Llama-like, plus four norms per layer (pre and post around attention and MLP), embeddings
scaled by sqrt(hidden), GELU-tanh MLP, per-head q/k norms, and local sliding-window layers interleaved with
global ones (every `sliding_window_pattern`-th layer is global), each kind with its own RoPE base.
"""

from __future__ import annotations

import torch
from torch import nn

from cumulo.models.attention import AttentionContext
from cumulo.models.config import ModelConfig
from cumulo.models.layers import Attention, CausalLM, GatedMLP, RMSNorm, RotaryEmbedding


def is_global_layer(config: ModelConfig, layer_idx: int) -> bool:
    pattern = config.sliding_window_pattern or 6
    return (layer_idx + 1) % pattern == 0


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        window = None if is_global_layer(config, layer_idx) else config.sliding_window
        self.self_attn = Attention(
            layer_idx,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            rotary,
            qkv_bias=config.attention_bias,
            qk_norm=RMSNorm(config.head_dim, eps, offset=1.0),
            k_norm=RMSNorm(config.head_dim, eps, offset=1.0),
            scale=scale,
            sliding_window=window,
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        max_pos = config.max_position_embeddings
        global_rope = RotaryEmbedding(config.head_dim, max_pos, config.rope_theta, config.rope_scaling)
        local_rope = RotaryEmbedding(config.head_dim, max_pos, config.rope_local_base_freq or 10000.0)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, global_rope if is_global_layer(config, i) else local_rope)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # HF rounds the scale to the activation dtype before multiplying; do the same for exact parity.
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.norm(x)


class Gemma3ForCausalLM(CausalLM):
    model_class = Gemma3Model
