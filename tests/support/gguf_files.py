"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them: the converter's tensor names,
its q/k row permutation for Llama, Gemma's norms stored as (1 + w), optional quantized tensors, and the
tokenizer.ggml.* metadata of a byte-level BPE tokenizer. The source weights come from a Hugging Face directory
(`tests.support.checkpoints`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.support.checkpoints import SPECIALS


def tokenizer_gguf_metadata(tokenizer_dir: Path) -> dict:
    """tokenizer.ggml.* values for the tiny tokenizer, as llama.cpp's converter writes a byte-level BPE."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if token in SPECIALS else 1 for token in tokens]
    return {
        "model": "gpt2",
        "pre": "gpt2",
        "tokens": tokens,
        "merges": merges,
        "types": types,
        "bos": tokens.index("<|im_start|>"),
        "eos": tokens.index("<|endoftext|>"),
    }


_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
_GEMMA_LAYER = {
    **_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(hf_name: str, arch: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    table = _GEMMA_LAYER if arch == "gemma3" else _LAYER
    return f"blk.{layer}.{table[rest]}.{suffix}"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: per head, interleave the two rotary halves of the rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tokenizer(writer: Any, tokenizer: dict) -> None:
    """tokenizer.ggml.* from `tokenizer` (as tokenizer_gguf_metadata gives it; merges, scores, add_bos and a chat
    template where present)."""
    writer.add_tokenizer_model(tokenizer["model"])
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    if tokenizer.get("merges"):
        writer.add_token_merges(tokenizer["merges"])
    if tokenizer.get("scores"):
        writer.add_token_scores(tokenizer["scores"])
    writer.add_bos_token_id(tokenizer["bos"])
    writer.add_eos_token_id(tokenizer["eos"])
    writer.add_add_bos_token(tokenizer.get("add_bos", False))
    if tokenizer.get("chat_template"):
        writer.add_chat_template(tokenizer["chat_template"])


def write_gguf(
    path: Path,
    arch: str,
    state: dict[str, torch.Tensor],
    config: dict,
    tokenizer: dict,
    qtypes: dict[str, object] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write `state` (Hugging Face names) as a GGUF file; returns the float32 tensors a reader should get back
    (quantized ones after their quantization round trip), under Hugging Face names."""
    import gguf

    qtypes = qtypes or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtypes else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer)
    expected: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        array = tensor.float().numpy().copy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0  # the converter folds Gemma's (1 + w) into the stored weight
        qtype = next((q for pattern, q in qtypes.items() if pattern in name), None)
        if qtype is not None and array.ndim == 2:
            stored = gguf.quants.quantize(array, qtype)
            array = gguf.quants.dequantize(stored, qtype).reshape(array.shape)
        else:
            qtype, stored = None, array
        expected[name] = array - 1.0 if arch == "gemma3" and name.endswith("norm.weight") else array
        if arch == "llama" and "q_proj" in name:
            stored = llama_cpp_permute(stored, config["num_attention_heads"])
        elif arch == "llama" and "k_proj" in name:
            stored = llama_cpp_permute(stored, config["num_key_value_heads"])
        writer.add_tensor(gguf_name(name, arch), stored, raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():  # GGUF-only tensors such as rope_freqs.weight
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


# DeepSeek-V3's Hugging Face names -> llama.cpp's deepseek2 names (its tensor map), for the tensors outside _LAYER
_DEEPSEEK_LAYER = {
    **_LAYER,
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
_STACKED = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_deepseek2_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    shape: dict,
    tokenizer: dict,
    *,
    split_kv_b: bool = True,
    gating: int = 2,
    expert_qtype: object | None = None,
) -> dict[str, np.ndarray]:
    """A DeepSeek-V3 (`state`: Hugging Face names; `shape`: its config keys) as llama.cpp's converter writes a
    `deepseek2`: MLA as one key/value head of kv_lora_rank + rope, the per-head widths under *_length_mla,
    kv_b_proj split into attn_k_b (transposed per head) and attn_v_b (`split_kv_b=False`: one attn_kv_b, as
    converters before that split wrote it), experts stacked into ffn_*_exps (optionally quantized), the
    selection bias as exp_probs_b.bias, YaRN's mscale_all_dim as 0.1 x the log multiplier. Returns what a reader
    should give back, by Hugging Face name."""
    import gguf

    from cumulo.models.gguf import split_kv_b as split

    heads, nope = shape["num_attention_heads"], shape["qk_nope_head_dim"]
    rope = shape["qk_rope_head_dim"]
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_name("tiny-deepseek2")
    writer.add_context_length(shape["max_position_embeddings"])
    writer.add_embedding_length(shape["hidden_size"])
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_block_count(shape["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(shape.get("rms_norm_eps", 1e-6))
    if shape.get("q_lora_rank"):
        writer.add_q_lora_rank(shape["q_lora_rank"])
    writer.add_kv_lora_rank(shape["kv_lora_rank"])
    writer.add_key_length(shape["kv_lora_rank"] + rope)
    writer.add_value_length(shape["kv_lora_rank"])
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(shape["v_head_dim"])
    writer.add_rope_dimension_count(rope)
    writer.add_leading_dense_block_count(shape["first_k_dense_replace"])
    writer.add_expert_count(shape["n_routed_experts"])
    writer.add_expert_used_count(shape["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(shape["moe_intermediate_size"])
    writer.add_expert_shared_count(shape["n_shared_experts"])
    writer.add_expert_weights_scale(shape["routed_scaling_factor"])
    writer.add_expert_weights_norm(shape["norm_topk_prob"])
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType(gating))
    writer.add_expert_group_count(shape["n_group"])
    writer.add_expert_group_used_count(shape["topk_group"])
    rope_params = dict(shape.get("rope_parameters") or {})
    writer.add_rope_freq_base(rope_params.get("rope_theta", 10000.0))
    if rope_params.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope_params["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope_params["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope_params["mscale_all_dim"])
    _add_tokenizer(writer, tokenizer)
    expected: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in state.items():
        array = tensor.float().numpy().copy()
        stem, suffix = name.rsplit(".", 1)
        if name.endswith(".mlp.experts.gate_up_proj"):  # transformers 5's fused [E, 2I, H], gate rows first
            half = array.shape[1] // 2
            for e in range(array.shape[0]):
                experts.setdefault((name.split(".")[2], "gate_proj"), {})[e] = array[e, :half]
                experts.setdefault((name.split(".")[2], "up_proj"), {})[e] = array[e, half:]
            continue
        if name.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            for e in range(array.shape[0]):
                experts.setdefault((name.split(".")[2], "down_proj"), {})[e] = array[e]
            continue
        if ".mlp.experts." in name:  # model.layers.N.mlp.experts.E.proj.weight
            layer, rest = stem.split(".mlp.experts.")
            e, proj = rest.split(".")
            experts.setdefault((layer.split(".")[-1], proj), {})[int(e)] = array
            continue
        expected[name] = array
        if stem in _TOP:
            writer.add_tensor(f"{_TOP[stem]}.{suffix}", array)
            continue
        _, _, layer, rest = stem.split(".", 3)
        if rest == "mlp.gate" and suffix == "e_score_correction_bias":
            writer.add_tensor(f"blk.{layer}.exp_probs_b.bias", array)
        elif rest == "self_attn.kv_b_proj" and split_kv_b:
            k_b, v_b = split(torch.from_numpy(array), heads, nope)
            writer.add_tensor(f"blk.{layer}.attn_k_b.weight", k_b.numpy())
            writer.add_tensor(f"blk.{layer}.attn_v_b.weight", v_b.numpy())
        else:
            writer.add_tensor(f"blk.{layer}.{_DEEPSEEK_LAYER[rest]}.{suffix}", array)
    for (layer, proj), per_expert in experts.items():
        stacked = np.stack([per_expert[e] for e in sorted(per_expert)])  # [E, out, in]
        raw = stacked if expert_qtype is None else gguf.quants.quantize(stacked, expert_qtype)
        back = (
            stacked
            if expert_qtype is None
            else gguf.quants.dequantize(raw, expert_qtype).reshape(stacked.shape)
        )
        writer.add_tensor(f"blk.{layer}.{_STACKED[proj]}.weight", raw, raw_dtype=expert_qtype)
        for e in sorted(per_expert):
            expected[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = back[e].copy()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
