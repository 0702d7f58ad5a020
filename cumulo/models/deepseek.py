"""DeepSeek-V3 (and R1, V3.1, same shapes): multi-head latent attention (`cumulo.models.mla`), the first
`first_k_dense_replace` layers with a dense gated MLP, the rest mixture-of-experts with shared experts and
DeepSeek's group-limited sigmoid router; YaRN rotary, interleaved.

Reads top-down: Router -> MoE -> DecoderLayer -> Model -> ForCausalLM. Weights load by Hugging Face names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.models.attention import AttentionContext
from cumulo.models.config import ModelConfig
from cumulo.models.layers import CausalLM, GatedMLP, RMSNorm, RotaryEmbedding
from cumulo.models.llama import LlamaModel
from cumulo.models.mla import MLAttention
from cumulo.models.moe import Experts


class DeepseekRouter(nn.Module):
    """Sigmoid scores per expert; the selection adds `e_score_correction_bias` (DeepSeek's auxiliary-loss-free
    load balancing) but the weights do not. Selection is group-limited: the experts fall in `n_group` groups, a
    group's score is the sum of its two best biased scores, only the best `topk_group` groups are eligible.
    The chosen experts' unbiased scores, normalised to sum to 1 if `norm_topk_prob`, times
    `routed_scaling_factor`, weight their outputs. All in fp32, whatever the activations' dtype."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # a parameter, not a buffer, so the loader requires it from the checkpoint like any weight
        self.e_score_correction_bias = nn.Parameter(torch.empty(config.num_experts))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits [T, E], fp32."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] fp32, expert ids [T, k] long)."""
        return self.select(self.logits(x))

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] fp32 -> (weights [T, k] fp32, expert ids [T, k] long)."""
        scores = logits.sigmoid()  # [T, E]
        biased = scores + self.e_score_correction_bias.float()
        T, E = biased.shape
        if self.n_group > 1:
            grouped = biased.view(T, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
            best = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            biased = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(T, E)
        ids = biased.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class DeepseekMoE(nn.Module):
    """Routed experts (only the chosen ones run, see `moe.Experts`) plus always-on shared experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = DeepseekRouter(config)
        self.experts = Experts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act
        )
        width = config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = GatedMLP(config.hidden_size, width, config.hidden_act) if width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts.sigmoid_routed(x, self.gate)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx, rotary)
        self.mlp: nn.Module
        if layer_idx >= config.first_k_dense_replace and config.num_experts:
            self.mlp = DeepseekMoE(config)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(LlamaModel):
    """Llama's stack of pre-norm layers, with DeepSeek's layers and a rotary table over the decoupled rope part
    only (`qk_rope_head_dim`), interleaved as DeepSeek's checkpoints expect."""

    layer_class = DeepseekDecoderLayer

    @staticmethod
    def make_rotary(config: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(
            config.qk_rope_head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            interleaved=config.rope_interleave,
        )


class DeepseekV3ForCausalLM(CausalLM):
    model_class = DeepseekModel
