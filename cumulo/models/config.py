"""`ModelConfig`: what an architecture needs to know about a checkpoint, whatever file it came from.

Field names follow Hugging Face's config.json where one exists, so a loader for either GGUF metadata or a
config.json fills the same dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3" | "gemma3"
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
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # provenance
    name: str = ""
    torch_dtype: str = "float32"  # dtype the checkpoint was stored in, informational
