"""The Llama family (Llama 2/3, Mistral, SmolLM2) and its close relatives Qwen2 (q/k/v biases) and Qwen3
(per-head q/k RMSNorm): pre-norm decoder layers, gated SiLU MLP, rotate-half RoPE, grouped-query attention.

Reads top-down: DecoderLayer -> Model -> ForCausalLM. Weights load by Hugging Face names; see `registry`.
"""

from __future__ import annotations

import torch
from torch import nn

from cumulo.models.attention import AttentionContext
from cumulo.models.config import ModelConfig
from cumulo.models.layers import Attention, CausalLM, GatedMLP, RMSNorm, RotaryEmbedding


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        qk_norm = config.architecture in ("qwen3", "qwen3_moe")
        self.self_attn = Attention(
            layer_idx,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            rotary,
            qkv_bias=config.attention_bias,
            qk_norm=RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None,
            k_norm=RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None,
            sliding_window=config.sliding_window,
        )
        self.mlp = self.make_mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config: ModelConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block; a mixture-of-experts architecture returns its sparse block here."""
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    layer_class: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary = self.make_rotary(config)
        self.layers = nn.ModuleList(
            self.layer_class(config, i, rotary) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @staticmethod
    def make_rotary(config: ModelConfig) -> RotaryEmbedding:
        """The one rotary table every layer shares."""
        return RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    model_class = LlamaModel
