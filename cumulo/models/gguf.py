"""Read a GGUF file into a `ModelConfig`, Hugging Face-named float tensors and a tokenizer.

Three things differ from a Hugging Face checkpoint and are undone here:
- names (`blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`) and dimension order (GGUF lists
  dimensions fastest first, so a [out, in] matrix is stored with shape [in, out]);
- for the llama architecture, llama.cpp's converter permutes the rows of q_proj and k_proj so each head's
  rotary pairs sit next to each other (interleaved RoPE); Hugging Face's rotate-half layout needs the inverse.
  Qwen2, Qwen3 and Gemma 3 use rotate-half in llama.cpp too and are stored unpermuted;
- Gemma's RMSNorm computes x * (1 + w) and the converter stores w + 1, so 1 is subtracted back;
- mixture-of-experts layers store all experts of a projection as one 3-D tensor (`blk.N.ffn_gate_exps` is
  [E, I, H] in torch order); they are split into Hugging Face's per-expert weights (`mlp.experts.{e}.gate_proj`);
- DeepSeek-V3 (`deepseek2`): llama.cpp's converter splits each layer's `kv_b_proj` into `attn_k_b` (the key half,
  transposed per head) and `attn_v_b` for its absorbed decode, and writes MLA as one key/value head; both are
  undone (`merge_kv_b`), and files from before that split (`attn_kv_b`) load too.
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

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "deepseek2")
# GGUF general.architecture -> ModelConfig.architecture, where they differ
_ARCHITECTURE = {"qwen3moe": "qwen3_moe", "deepseek2": "deepseek_v3"}
# llama.cpp's expert_gating_func values (llama-hparams.h); DeepSeek-V3 routes with sigmoid scores
_GATING_SOFTMAX, _GATING_SIGMOID = 1, 2

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
    # multi-head latent attention (DeepSeek-V3)
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
}
# the two halves of kv_b_proj as llama.cpp's converter stores them (merged back by `_read_weights`)
_KV_B_HALVES = {"attn_k_b": "k_b", "attn_v_b": "v_b"}
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
    if match and match.group(2) in _KV_B_HALVES:
        return f"model.layers.{match.group(1)}.self_attn.kv_b_proj.{_KV_B_HALVES[match.group(2)]}"
    if match and match.group(2) == "exp_probs_b":
        return f"model.layers.{match.group(1)}.mlp.gate.e_score_correction_bias"
    names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"
    raise UnsupportedArchitecture(f"GGUF tensor {gguf_name!r} has no place in the {arch} architecture")


def split_kv_b(kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj [heads * (nope + v), rank] as llama.cpp's converter stores it: k_b [heads, rank, nope] (each
    head's key half, transposed for the absorbed decode) and v_b [heads, v, rank], both in torch order."""
    per_head = kv_b.reshape(heads, kv_b.shape[0] // heads, kv_b.shape[1])
    return per_head[:, :nope].transpose(1, 2).contiguous(), per_head[:, nope:].contiguous()


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """The inverse of `split_kv_b`: kv_b_proj's [heads * (nope + v), rank] weight."""
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise InvalidModel(f"attn_k_b {tuple(k_b.shape)} and attn_v_b {tuple(v_b.shape)} do not pair up")
    merged = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [heads, nope + v, rank]
    return merged.reshape(-1, merged.shape[-1]).contiguous()


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
    if architecture == "deepseek_v3":
        _apply_deepseek2(config, get, path)
    return config


def _apply_deepseek2(config: ModelConfig, get: Any, path: Path) -> None:
    """Multi-head latent attention and DeepSeek-V3's routing from `deepseek2.*`. The converter writes MLA as one
    key/value head `kv_lora_rank + rope` wide (its cache entry) and the per-head widths as `*_length_mla`; files
    from before those keys give the per-head widths as key/value_length. YaRN's magnitude factor travels as
    `yarn_log_multiplier` = 0.1 * mscale_all_dim; DeepSeek's mscale equals mscale_all_dim, as in V3 and R1."""
    try:
        config.kv_lora_rank = int(get("attention.kv_lora_rank"))
        config.qk_rope_head_dim = int(get("rope.dimension_count"))
        key = get("attention.key_length_mla")
        value = get("attention.value_length_mla")
        if key is None:  # before llama.cpp's MLA split: the per-head widths themselves
            key, value = get("attention.key_length"), get("attention.value_length")
        config.qk_nope_head_dim = int(key) - config.qk_rope_head_dim
        config.v_head_dim = int(value)
        config.num_experts = int(get("expert_count") or 0)
        config.num_experts_per_tok = int(get("expert_used_count") or 0)
        config.moe_intermediate_size = int(get("expert_feed_forward_length") or 0)
    except TypeError:
        raise InvalidModel(f"{path.name}: GGUF metadata lacks a deepseek2 attention or expert key") from None
    q_lora = get("attention.q_lora_rank")
    config.q_lora_rank = int(q_lora) if q_lora else None
    config.num_shared_experts = int(get("expert_shared_count") or 0)
    config.routed_scaling_factor = float(get("expert_weights_scale") or 1.0)
    config.norm_topk_prob = bool(get("expert_weights_norm", False))
    config.n_group = int(get("expert_group_count") or 1)
    config.topk_group = int(get("expert_group_used_count") or config.n_group)
    config.first_k_dense_replace = int(get("leading_dense_block_count") or 0)
    config.num_key_value_heads = config.num_attention_heads
    config.head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    # llama.cpp's deepseek2 rotates adjacent pairs, on the rows as DeepSeek stores them
    config.rope_interleave = True
    if config.num_experts:
        gating = get("expert_gating_func")
        if gating != _GATING_SIGMOID:
            name = {None: "absent, so softmax", _GATING_SOFTMAX: "softmax"}.get(gating, str(gating))
            raise UnsupportedArchitecture(
                f"{path.name}: deepseek2 with expert gating {name} is DeepSeek-V2; "
                "only DeepSeek-V3's sigmoid routing (V3, R1, V3.1) is supported"
            )
        if not 0 < config.num_experts_per_tok <= config.num_experts or config.num_experts % config.n_group:
            raise InvalidModel(
                f"{path.name}: {config.num_experts} experts, {config.num_experts_per_tok} used, "
                f"in {config.n_group} groups do not fit together"
            )
    if config.rope_scaling and config.rope_scaling["rope_type"] == "yarn":
        mscale = float(get("rope.scaling.yarn_log_multiplier") or 0.0) / 0.1
        config.rope_scaling.update(
            mscale=mscale,
            mscale_all_dim=mscale,
            beta_fast=float(get("rope.scaling.yarn_beta_fast") or 32.0),
            beta_slow=float(get("rope.scaling.yarn_beta_slow") or 1.0),
        )


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
    halves: dict[str, dict[str, torch.Tensor]] = {}  # kv_b_proj's k_b and v_b, until both are read
    for gguf_name in gguf.tensors:
        name = _hf_name(gguf_name, arch)
        if name is None:
            continue
        weight = torch.from_numpy(gguf.tensor(gguf_name))
        if name.endswith((".kv_b_proj.k_b", ".kv_b_proj.v_b")):
            prefix, _, half = name.rpartition(".")
            halves.setdefault(prefix, {})[half] = weight
            if len(halves[prefix]) == 2:
                out[f"{prefix}.weight"] = merge_kv_b(halves[prefix]["k_b"], halves.pop(prefix)["v_b"]).to(
                    dtype
                )
            continue
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
    if halves:
        raise InvalidModel(f"{', '.join(sorted(halves))}: attn_k_b without attn_v_b, or the other way round")
    return out


def format_of(path: Path) -> str:
    """`gguf:<file type>` read from the header alone."""
    gguf = GGUFFile(path)
    return _format_name(gguf.metadata, gguf)
