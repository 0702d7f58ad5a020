"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them: the converter's tensor names,
its q/k row permutation for Llama, Gemma's norms stored as (1 + w), optional quantized tensors, and the
tokenizer.ggml.* metadata of a byte-level BPE tokenizer. The source weights come from a Hugging Face directory
(`tests.support.checkpoints`)."""

from __future__ import annotations

import json
from pathlib import Path

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
