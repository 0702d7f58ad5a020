"""Read a Hugging Face-style model directory: config.json, *.safetensors (single or sharded), tokenizer.

Tensor names are already Hugging Face's; only multimodal Gemma 3 checkpoints nest the text model under
`language_model.` and are flattened here (their vision tower is left out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cumulo.errors import InvalidModel, UnsupportedArchitecture
from cumulo.models.config import ModelConfig

# model_type in config.json -> ModelConfig.architecture
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "qwen3_moe": "qwen3_moe",
    "deepseek_v3": "deepseek_v3",
}
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{path}: not a readable config.json ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidModel(f"{path}: config.json is not a JSON object")
    return data


def _text_config(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("model_type") == "gemma3" and isinstance(raw.get("text_config"), dict):
        return {**raw["text_config"], "model_type": "gemma3_text"}
    return raw


def config_from_json(raw: dict[str, Any], directory: Path) -> ModelConfig:
    text = _text_config(raw)
    model_type = text.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{directory.name}: model_type {model_type!r} is not supported "
            f"({', '.join(sorted(ARCHITECTURES))})"
        )
    arch = ARCHITECTURES[model_type]
    try:
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        config = ModelConfig(
            architecture=arch,
            vocab_size=int(text["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModel(f"{directory.name}: config.json lacks a model shape key ({exc})") from exc
    config.max_position_embeddings = int(text.get("max_position_embeddings") or 2048)
    config.rms_norm_eps = float(text.get("rms_norm_eps") or 1e-6)
    _apply_rope(config, text, arch)
    tie_default = arch == "gemma3"
    config.tie_word_embeddings = bool(
        raw.get("tie_word_embeddings", text.get("tie_word_embeddings", tie_default))
    )
    config.hidden_act = str(text.get("hidden_activation") or text.get("hidden_act") or "silu")
    config.attention_bias = bool(text.get("attention_bias", arch == "qwen2"))
    if arch == "gemma3":
        config.sliding_window = text.get("sliding_window")
        config.sliding_window_pattern = text.get("sliding_window_pattern") or _pattern_of(text) or 6
        config.rope_local_base_freq = float(
            text.get("rope_local_base_freq") or config.rope_local_base_freq or 10_000.0
        )
        config.query_pre_attn_scalar = float(text.get("query_pre_attn_scalar") or config.head_dim)
        config.final_logit_softcapping = text.get("final_logit_softcapping")
        config.attn_logit_softcapping = text.get("attn_logit_softcapping")
    if arch == "qwen3_moe":
        _apply_qwen3_moe(config, text)
    if arch == "deepseek_v3":
        _apply_deepseek_v3(config, text)
    bos = text.get("bos_token_id", raw.get("bos_token_id"))
    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    config.bos_token_id = bos if isinstance(bos, int) else None
    config.eos_token_ids = [eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)]
    config.name = directory.name
    config.torch_dtype = str(
        text.get("torch_dtype") or raw.get("torch_dtype") or raw.get("dtype") or "float32"
    )
    if raw.get("quantization_config"):  # what placement sizes its weights by (the loader keeps them packed)
        from cumulo.formats.checkpoint import format_of

        config.stored_format = format_of(raw["quantization_config"])
    return config


def _apply_rope(config: ModelConfig, text: dict[str, Any], arch: str) -> None:
    """RoPE base and scaling from either the classic keys (`rope_theta`, `rope_scaling`) or transformers 5's
    `rope_parameters`, which Gemma 3 nests per attention kind (`full_attention`, `sliding_attention`)."""
    params = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), dict) else {}
    if isinstance(params.get("full_attention"), dict):
        local = params.get("sliding_attention") or {}
        if local.get("rope_theta"):
            config.rope_local_base_freq = float(local["rope_theta"])
        params = params["full_attention"]
    theta = text.get("rope_theta") or params.get("rope_theta")
    config.rope_theta = float(theta or (1_000_000.0 if arch == "gemma3" else 10_000.0))
    scaling = text.get("rope_scaling") or params
    if isinstance(scaling, dict):
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", scaling.get("type"))
        config.rope_scaling = None if scaling.get("rope_type") in (None, "default") else scaling


def _apply_qwen3_moe(config: ModelConfig, text: dict[str, Any]) -> None:
    """The routed experts' shape and which layers use them. transformers 5 writes the expert count as
    `num_local_experts`, published checkpoints as `num_experts`."""
    try:
        config.num_experts = int(text.get("num_experts") or text["num_local_experts"])
        config.num_experts_per_tok = int(text["num_experts_per_tok"])
        config.moe_intermediate_size = int(text["moe_intermediate_size"])
        config.decoder_sparse_step = int(text.get("decoder_sparse_step") or 1)
        config.mlp_only_layers = [int(i) for i in text.get("mlp_only_layers") or []]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModel(f"config.json lacks a mixture-of-experts key ({exc})") from exc
    config.norm_topk_prob = bool(text.get("norm_topk_prob", False))
    if not 0 < config.num_experts_per_tok <= config.num_experts:
        raise InvalidModel(
            f"config.json: num_experts_per_tok {config.num_experts_per_tok} is not within 1..{config.num_experts}"
        )


def _apply_deepseek_v3(config: ModelConfig, text: dict[str, Any]) -> None:
    """Multi-head latent attention and DeepSeek's routed + shared experts. Every head attends with its own
    key and value (expanded from one latent), so num_key_value_heads is the head count whatever config.json
    says, and head_dim is the query/key width (non-rotary + rotary part)."""
    try:
        config.kv_lora_rank = int(text["kv_lora_rank"])
        config.q_lora_rank = int(text["q_lora_rank"]) if text.get("q_lora_rank") else None
        config.qk_nope_head_dim = int(text["qk_nope_head_dim"])
        config.qk_rope_head_dim = int(text["qk_rope_head_dim"])
        config.v_head_dim = int(text["v_head_dim"])
        config.num_experts = int(text.get("n_routed_experts") or 0)
        config.num_experts_per_tok = int(text.get("num_experts_per_tok") or 0)
        config.moe_intermediate_size = int(text.get("moe_intermediate_size") or 0)
        config.num_shared_experts = int(text.get("n_shared_experts") or 0)
        config.routed_scaling_factor = float(text.get("routed_scaling_factor") or 1.0)
        config.n_group = int(text.get("n_group") or 1)
        config.topk_group = int(text.get("topk_group") or 1)
        config.first_k_dense_replace = int(text.get("first_k_dense_replace") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModel(f"config.json lacks a DeepSeek-V3 key ({exc})") from exc
    config.norm_topk_prob = bool(text.get("norm_topk_prob", False))
    config.rope_interleave = bool(text.get("rope_interleave", True))
    config.num_key_value_heads = config.num_attention_heads
    config.head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.num_experts:
        if not 0 < config.num_experts_per_tok <= config.num_experts:
            raise InvalidModel(
                f"config.json: num_experts_per_tok {config.num_experts_per_tok} is not within 1..{config.num_experts}"
            )
        if config.num_experts % config.n_group or not 0 < config.topk_group <= config.n_group:
            raise InvalidModel(
                f"config.json: {config.num_experts} experts do not fall into n_group {config.n_group} groups "
                f"of which topk_group {config.topk_group} are kept"
            )


def _pattern_of(text: dict[str, Any]) -> int | None:
    """Newer configs list `layer_types`; the pattern is the distance between full-attention layers."""
    types = text.get("layer_types")
    if isinstance(types, list) and "full_attention" in types:
        return types.index("full_attention") + 1
    return None


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidModel(f"{index}: not a readable safetensors index ({exc})") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InvalidModel(f"{directory}: no *.safetensors weights")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InvalidModel(f"{directory}: missing weight shards: {', '.join(missing)}")
    return files


def sealed_files(directory: Path) -> list[Path]:
    """Every file that decides the model's outputs: weights, index, config and tokenizer files."""
    extra = [directory / name for name in (*SIDE_FILES, "model.safetensors.index.json")]
    return weight_files(directory) + [p for p in extra if p.is_file()]


def hf_name(name: str) -> str | None:
    """Our name for a checkpoint tensor name (multimodal prefixes dropped), or None for tensors we skip."""
    if name.startswith("language_model."):
        name = name.removeprefix("language_model.")
    elif name.startswith(("vision_tower.", "multi_modal_projector.")):
        return None
    if name.startswith("model.language_model."):  # transformers >= 4.52 layout of multimodal Gemma 3
        name = "model." + name.removeprefix("model.language_model.")
    elif name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        return None
    return name


def read_weights(directory: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    # One tensor at a time, each in memory of its own (not views of a mapping of the whole file, whose pages
    # would stay resident as long as any tensor of the file lives): a cast frees the stored copy at once.
    from cumulo.formats.checkpoint import iter_safetensors

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        for name, tensor in iter_safetensors(path, wanted=lambda n: hf_name(n) is not None):
            out[str(hf_name(name))] = tensor.to(dtype)
    return unstack_experts(out)


def unstack_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Experts stored stacked (transformers' in-memory layout: `mlp.experts.gate_up_proj` [E, 2I, H],
    `mlp.experts.down_proj` [E, H, I], no `.weight`) -> one 2-D weight per expert under the published names
    (`mlp.experts.{e}.gate_proj.weight` ...), so every later step (fusion, conversion, packed swap) sees one
    layout. Other weights pass through; the dict is modified in place and returned."""
    for name in [n for n in weights if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        stacked = weights[name]
        if stacked.dim() != 3:
            continue
        del weights[name]
        prefix, _, kind = name.rpartition(".")
        for e, w in enumerate(stacked.unbind(0)):
            if kind == "gate_up_proj":
                gate, up = w.chunk(2, dim=0)
                weights[f"{prefix}.{e}.gate_proj.weight"] = gate.clone()
                weights[f"{prefix}.{e}.up_proj.weight"] = up.clone()
            else:
                weights[f"{prefix}.{e}.down_proj.weight"] = w.clone()
    return weights


_SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def stored_dtype(directory: Path) -> str:
    """The dtype most weights are stored in, read from the safetensors headers (no tensor data)."""
    from safetensors import SafetensorError, safe_open

    counts: dict[str, int] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    dtype = handle.get_slice(name).get_dtype()
                    counts[dtype] = counts.get(dtype, 0) + 1
        except (SafetensorError, OSError) as exc:
            raise InvalidModel(f"{path.name}: not a readable safetensors file ({exc})") from exc
    top = max(counts, key=lambda k: counts[k]) if counts else "F32"
    return _SAFETENSORS_DTYPES.get(top, top.lower())
