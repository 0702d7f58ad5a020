"""`ModelConfig`: what an architecture needs to know about a checkpoint, whatever file it came from.

Field names follow Hugging Face's config.json where one exists, so a loader for either GGUF metadata or a
config.json fills the same dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3" | "gemma3" | "qwen3_moe" | "deepseek_v3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF-style, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # gemma3: "gelu_pytorch_tanh"
    attention_bias: bool = False  # qwen2: True (q/k/v biases)
    # gemma3
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None  # every Nth layer is global (gemma3: 6)
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    # mixture of experts (qwen3_moe, deepseek_v3); num_experts 0 = a dense model
    num_experts: int = 0  # routed experts per MoE layer (HF: num_experts / n_routed_experts)
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # of one expert
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1
    num_shared_experts: int = 0  # deepseek_v3: n_shared_experts, each moe_intermediate_size wide
    routed_scaling_factor: float = 1.0  # deepseek_v3
    n_group: int = 1  # deepseek_v3: group-limited routing, experts in n_group groups ...
    topk_group: int = 1  # ... of which the best topk_group are eligible
    first_k_dense_replace: int = 0  # deepseek_v3: the first k layers are dense
    decoder_sparse_step: int = 1  # qwen3_moe: every Nth layer is MoE ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... except these, which are dense
    # multi-head latent attention (deepseek_v3)
    q_lora_rank: int | None = None  # None: q projected directly
    kv_lora_rank: int = 0  # width of the cached latent; 0 = not MLA
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # deepseek_v3: rotary pairs (2i, 2i+1) instead of (i, i + d/2)
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # provenance
    name: str = ""
    torch_dtype: str = "float32"  # dtype the checkpoint was stored in, informational
    stored_format: str | None = (
        None  # the compact format its linears are stored in (converted, or DeepSeek FP8)
    )
