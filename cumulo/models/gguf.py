"""Read a GGUF file into a `ModelConfig`, Hugging Face-named float tensors and a tokenizer.

Three things differ from a Hugging Face checkpoint and are undone here:
- names (`blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`) and dimension order (GGUF lists
  dimensions fastest first, so a [out, in] matrix is stored with shape [in, out]);
- for the llama architecture, llama.cpp's converter permutes the rows of q_proj and k_proj so each head's
  rotary pairs sit next to each other (interleaved RoPE); Hugging Face's rotate-half layout needs the inverse.
  Qwen2, Qwen3 and Gemma 3 use rotate-half in llama.cpp too and are stored unpermuted;
- Gemma's RMSNorm computes x * (1 + w) and the converter stores w + 1, so 1 is subtracted back;
- mixture-of-experts layers store all experts of a projection as one 3-D tensor (`blk.N.ffn_gate_exps` is
  [E, I, H] in torch order); they are split into Hugging Face's per-expert weights (`mlp.experts.{e}.gate_proj`).
Every tensor type is dequantized by the `gguf` package (`gguf.quants.dequantize`, via `gguf_file`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cumulo.errors import InvalidModel, UnsupportedArchitecture
from cumulo.models.config import ModelConfig
from cumulo.models.gguf_file import GGUFFile

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe")
_ARCHITECTURE = {
    "qwen3moe": "qwen3_moe"
}  # GGUF general.architecture -> ModelConfig.architecture, where they differ

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    # mixture of experts: the router, shared experts (DeepSeek) and the selection bias (DeepSeek-V3)
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# stacked experts: GGUF projection -> the per-expert Hugging Face projection
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Gemma 3 normalises four times per layer; its `ffn_norm` is the one before the MLP.
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(slots=True)
class GGUFContents:
    config: ModelConfig
    metadata: dict[str, Any]
    format: str  # "gguf:Q4_1"
    weights: dict[str, torch.Tensor] | None  # None when read with weights=False


def _hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors with no HF counterpart (rope_freqs)."""
    if gguf_name == "rope_freqs.weight":
        return None
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _EXPERT_NAMES:  # split per expert by `_read_weights`
        return f"model.layers.{match.group(1)}.mlp.experts.{_EXPERT_NAMES[match.group(2)]}"
    if match and match.group(2) == "exp_probs_b":
        return f"model.layers.{match.group(1)}.mlp.gate.e_score_correction_bias"
    names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"
    raise UnsupportedArchitecture(f"GGUF tensor {gguf_name!r} has no place in the {arch} architecture")


def _unpermute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k row permutation: per head, rows (pair index, 2) back to (2, half)."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    rest = weight.shape[1:]
    return weight.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def _llama3_rope_scaling(freqs: np.ndarray) -> dict[str, Any]:
    # llama.cpp bakes Llama 3.1's rope scaling into per-frequency divisors; the largest divisor is the factor.
    # The other parameters are the same for every Llama 3.x release.
    return {
        "rope_type": "llama3",
        "factor": float(freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def _format_name(meta: dict[str, Any], gguf: GGUFFile) -> str:
    from gguf import LlamaFileType

    file_type = meta.get("general.file_type")
    try:
        return "gguf:" + LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        counts = Counter(t.type_name for t in gguf.tensors.values() if len(t.dims) > 1)
        return "gguf:" + (counts.most_common(1)[0][0] if counts else "F32")


def config_from_metadata(meta: dict[str, Any], gguf: GGUFFile, path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"{path.name}: architecture {arch!r} is not supported ({', '.join(SUPPORTED)})"
        )
    architecture = _ARCHITECTURE.get(arch, arch)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        return value[0] if isinstance(value, list) and value else value  # per-layer arrays: first layer

    tensors = gguf.tensors
    if "token_embd.weight" not in tensors:
        raise InvalidModel(f"{path.name}: GGUF file has no token_embd.weight tensor")
    try:
        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        layers = int(get("block_count"))
        intermediate = int(get("feed_forward_length"))
    except TypeError:
        raise InvalidModel(f"{path.name}: GGUF metadata lacks the {arch} shape keys") from None
    head_dim = int(get("attention.key_length") or hidden // heads)
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type in ("linear", "yarn") and get("rope.scaling.factor"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor"))}
        if get("rope.scaling.original_context_length"):
            rope_scaling["original_max_position_embeddings"] = int(
                get("rope.scaling.original_context_length")
            )
    if "rope_freqs.weight" in tensors:
        rope_scaling = _llama3_rope_scaling(gguf.tensor("rope_freqs.weight"))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    config = ModelConfig(
        architecture=architecture,
        vocab_size=int(tensors["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=[eos] if isinstance(eos, int) else [],
        name=str(meta.get("general.name") or path.stem),
    )
    if arch == "gemma3":
        config.hidden_act = "gelu_pytorch_tanh"
        config.sliding_window = int(get("attention.sliding_window") or 512)
        # Not in the metadata: llama.cpp hard-codes these for Gemma 3 as well (one global layer in six,
        # local RoPE base 10k, queries scaled by head_dim except the 27B, which uses hidden / heads).
        config.sliding_window_pattern = 6
        config.rope_local_base_freq = 10_000.0
        config.query_pre_attn_scalar = float(hidden // heads if layers == 62 else head_dim)
        config.final_logit_softcapping = get("final_logit_softcapping")
        config.attn_logit_softcapping = get("attn_logit_softcapping")
    if architecture == "qwen3_moe":
        _apply_experts(config, get, tensors, path)
    return config


def _apply_experts(config: ModelConfig, get: Any, tensors: dict[str, Any], path: Path) -> None:
    """Qwen3-MoE's expert shape; a layer without a router (`ffn_gate_inp`) is dense, so `mlp_only_layers`
    lists those. llama.cpp renormalises Qwen3-MoE's top-k weights unless the file says otherwise."""
    try:
        config.num_experts = int(get("expert_count"))
        config.num_experts_per_tok = int(get("expert_used_count"))
        config.moe_intermediate_size = int(get("expert_feed_forward_length"))
    except TypeError:
        raise InvalidModel(
            f"{path.name}: GGUF metadata lacks the expert count, used count or width"
        ) from None
    config.norm_topk_prob = bool(get("expert_weights_norm", True))
    config.mlp_only_layers = [
        i for i in range(config.num_hidden_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors
    ]


def read_gguf(path: Path, *, weights: bool = True, dtype: torch.dtype = torch.float32) -> GGUFContents:
    gguf = GGUFFile(path)
    meta = gguf.metadata
    config = config_from_metadata(meta, gguf, path)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    contents = GGUFContents(config=config, metadata=meta, format=_format_name(meta, gguf), weights=None)
    if weights:
        contents.weights = _read_weights(gguf, config, dtype)
    return contents


def _read_weights(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    arch = config.architecture
    out: dict[str, torch.Tensor] = {}
    for gguf_name in gguf.tensors:
        name = _hf_name(gguf_name, arch)
        if name is None:
            continue
        weight = torch.from_numpy(gguf.tensor(gguf_name))
        if name.endswith((".experts.gate_proj", ".experts.up_proj", ".experts.down_proj")):
            prefix, _, proj = name.rpartition(".")  # weight: [E, out, in]
            for e, expert in enumerate(weight.unbind(0)):
                out[f"{prefix}.{e}.{proj}.weight"] = expert.to(dtype)
            continue
        if arch == "llama" and ".self_attn.q_proj." in name:
            weight = _unpermute_rotary(weight, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            weight = _unpermute_rotary(weight, config.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            weight = weight - 1.0
        out[name] = weight.to(dtype)
    return out


def format_of(path: Path) -> str:
    """`gguf:<file type>` read from the header alone."""
    gguf = GGUFFile(path)
    return _format_name(gguf.metadata, gguf)
