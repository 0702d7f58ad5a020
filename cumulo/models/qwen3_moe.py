"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's decoder (per-head q/k RMSNorm, grouped-query attention)
whose feed-forward is a sparse block of routed experts: softmax over all experts, top-k, optionally
renormalised (`norm_topk_prob`), no shared expert. `decoder_sparse_step` and `mlp_only_layers` pick which layers
stay dense.

Reads top-down: SparseMoeBlock -> DecoderLayer -> Model -> ForCausalLM. Hugging Face names: the router is
`mlp.gate`, expert e is `mlp.experts.{e}.{gate,up,down}_proj` (gate/up fused on load by `registry`).
"""

from __future__ import annotations

import torch
from torch import nn

from cumulo.models.config import ModelConfig
from cumulo.models.layers import CausalLM
from cumulo.models.llama import LlamaDecoderLayer, LlamaModel
from cumulo.models.moe import Experts


def is_sparse_layer(config: ModelConfig, layer_idx: int) -> bool:
    """Whether layer `layer_idx` routes to experts, by the reference's rule: every `decoder_sparse_step`-th
    layer (1-based) unless listed in `mlp_only_layers`."""
    step = max(config.decoder_sparse_step, 1)
    return config.num_experts > 0 and layer_idx not in config.mlp_only_layers and (layer_idx + 1) % step == 0


class Qwen3MoeSparseBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts.softmax_routed(x, self.gate(x), self.top_k, self.norm_topk_prob)  # [T, H]


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_idx: int) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return Qwen3MoeSparseBlock(config)
        return super().make_mlp(config, layer_idx)


class Qwen3MoeModel(LlamaModel):
    layer_class = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(CausalLM):
    model_class = Qwen3MoeModel
