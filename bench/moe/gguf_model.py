"""Writes the benchmark's Qwen3-MoE as a GGUF with seeded random weights, as llama.cpp's converter lays one out:
experts stacked into 3-D `blk.N.ffn_{gate,up,down}_exps` tensors, the router as `ffn_gate_inp`, metadata under
`qwen3moe.*`, and the tokenizer copied from SmolLM2's GGUF so llama.cpp can load the file (random weights need no
matching vocabulary; they need a valid one). Every matrix is Q8_0 except the router and the norms (f32), which
is what `llama-quantize` does to a Q8_0 model, so both engines are handed the same stored weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from bench.moe.spec import DeepSeekSpec, MoeSpec

SEED = 0
GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output")


def file_name(spec: MoeSpec | DeepSeekSpec, seed: int = SEED) -> str:
    """A name that changes with anything that changes the file, so a cached copy is reused only when equal."""
    key = json.dumps({"spec": spec.as_dict(), "seed": seed, "version": 1}, sort_keys=True)
    arch = "deepseek2" if isinstance(spec, DeepSeekSpec) else "qwen3moe"
    return f"{arch}-random-{hashlib.sha256(key.encode()).hexdigest()[:12]}.Q8_0.gguf"


def write_model_gguf(
    spec: MoeSpec | DeepSeekSpec, path: Path, tokenizer_gguf: Path, seed: int = SEED
) -> Path:
    """The spec's architecture, written by its writer."""
    if isinstance(spec, DeepSeekSpec):
        return write_deepseek2_gguf(spec, path, tokenizer_gguf, seed)
    return write_moe_gguf(spec, path, tokenizer_gguf, seed)


def _copy_tokenizer(writer: object, source: Path) -> int:
    """Copies every tokenizer.* key of `source` into `writer`; returns the vocabulary size."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(source))
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type)
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    return vocab


def _matrix(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Normal weights scaled by 1/sqrt(fan_in), so activations keep their size through the layers."""
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)


def write_moe_gguf(spec: MoeSpec, path: Path, tokenizer_gguf: Path, seed: int = SEED) -> Path:
    """Writes the model to `path` (through a .part file, so an interrupted run leaves no half file)."""
    import gguf  # noqa: PLC0415

    q8 = gguf.GGMLQuantizationType.Q8_0
    tmp = path.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), "qwen3moe")
    writer.add_name("cumulo bench random qwen3moe")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.moe_intermediate)
    writer.add_block_count(spec.layers)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_expert_count(spec.num_experts)
    writer.add_expert_used_count(spec.top_k)
    writer.add_expert_feed_forward_length(spec.moe_intermediate)
    writer.add_expert_weights_norm(True)
    vocab = _copy_tokenizer(writer, tokenizer_gguf)
    if vocab != spec.vocab:
        raise ValueError(f"{tokenizer_gguf} has {vocab} tokens, the spec says {spec.vocab}")

    rng = np.random.default_rng(seed)
    h, hd, E, inter = spec.hidden, spec.head_dim, spec.num_experts, spec.moe_intermediate

    def quantized(name: str, weights: np.ndarray) -> None:
        writer.add_tensor(name, gguf.quants.quantize(weights, q8), raw_dtype=q8)

    def plain(name: str, weights: np.ndarray) -> None:
        writer.add_tensor(name, weights.astype(np.float32))

    quantized(
        "token_embd.weight", _matrix(rng, spec.vocab, h)
    )  # tied: llama.cpp and Cumulo reuse it as lm_head
    plain("output_norm.weight", np.ones(h, np.float32))
    for n in range(spec.layers):
        b = f"blk.{n}"
        plain(f"{b}.attn_norm.weight", np.ones(h, np.float32))
        plain(f"{b}.ffn_norm.weight", np.ones(h, np.float32))
        plain(f"{b}.attn_q_norm.weight", np.ones(hd, np.float32))
        plain(f"{b}.attn_k_norm.weight", np.ones(hd, np.float32))
        quantized(f"{b}.attn_q.weight", _matrix(rng, spec.heads * hd, h))
        quantized(f"{b}.attn_k.weight", _matrix(rng, spec.kv_heads * hd, h))
        quantized(f"{b}.attn_v.weight", _matrix(rng, spec.kv_heads * hd, h))
        quantized(f"{b}.attn_output.weight", _matrix(rng, h, spec.heads * hd))
        plain(f"{b}.ffn_gate_inp.weight", _matrix(rng, E, h))  # the router: f32, as llama-quantize leaves it
        quantized(f"{b}.ffn_gate_exps.weight", _matrix(rng, E, inter, h))  # [E, out, in] in torch order
        quantized(f"{b}.ffn_up_exps.weight", _matrix(rng, E, inter, h))
        quantized(f"{b}.ffn_down_exps.weight", _matrix(rng, E, h, inter))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def write_deepseek2_gguf(spec: DeepSeekSpec, path: Path, tokenizer_gguf: Path, seed: int = SEED) -> Path:
    """A seeded random DeepSeek-V3 laid out as llama.cpp's converter writes a `deepseek2` (metadata keys and
    tensor names of its conversion/deepseek.py): MLA as one key/value head kv_lora_rank + rope wide with the
    per-head widths under *_length_mla, kv_b_proj stored as attn_k_b [H, rank, nope] and attn_v_b [H, v, rank]
    (torch order), stacked routed experts, shared experts as *_shexp, the selection bias as exp_probs_b.bias.
    Matrices are Q8_0; norms, the router and its bias f32."""
    import gguf  # noqa: PLC0415

    q8 = gguf.GGMLQuantizationType.Q8_0
    tmp = path.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), "deepseek2")
    writer.add_name("cumulo bench random deepseek2")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.dense_intermediate)
    writer.add_block_count(spec.layers)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.qk_rope_head_dim)
    writer.add_q_lora_rank(spec.q_lora_rank)
    writer.add_kv_lora_rank(spec.kv_lora_rank)
    writer.add_key_length(spec.kv_lora_rank + spec.qk_rope_head_dim)
    writer.add_value_length(spec.kv_lora_rank)
    writer.add_key_length_mla(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    writer.add_value_length_mla(spec.v_head_dim)
    writer.add_leading_dense_block_count(spec.first_dense)
    writer.add_expert_count(spec.num_experts)
    writer.add_expert_used_count(spec.top_k)
    writer.add_expert_shared_count(spec.shared_experts)
    writer.add_expert_feed_forward_length(spec.moe_intermediate)
    writer.add_expert_weights_scale(spec.routed_scaling_factor)
    writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_group_count(spec.n_group)
    writer.add_expert_group_used_count(spec.topk_group)
    vocab = _copy_tokenizer(writer, tokenizer_gguf)
    if vocab != spec.vocab:
        raise ValueError(f"{tokenizer_gguf} has {vocab} tokens, the spec says {spec.vocab}")

    rng = np.random.default_rng(seed)
    h, H, E, inter = spec.hidden, spec.heads, spec.num_experts, spec.moe_intermediate
    nope, rope, v, rank = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank

    def quantized(name: str, weights: np.ndarray) -> None:
        writer.add_tensor(name, gguf.quants.quantize(weights, q8), raw_dtype=q8)

    def plain(name: str, weights: np.ndarray) -> None:
        writer.add_tensor(name, weights.astype(np.float32))

    quantized("token_embd.weight", _matrix(rng, spec.vocab, h))  # tied
    plain("output_norm.weight", np.ones(h, np.float32))
    for n in range(spec.layers):
        b = f"blk.{n}"
        plain(f"{b}.attn_norm.weight", np.ones(h, np.float32))
        plain(f"{b}.ffn_norm.weight", np.ones(h, np.float32))
        plain(f"{b}.attn_q_a_norm.weight", np.ones(spec.q_lora_rank, np.float32))
        plain(f"{b}.attn_kv_a_norm.weight", np.ones(rank, np.float32))
        quantized(f"{b}.attn_q_a.weight", _matrix(rng, spec.q_lora_rank, h))
        quantized(f"{b}.attn_q_b.weight", _matrix(rng, H * (nope + rope), spec.q_lora_rank))
        quantized(f"{b}.attn_kv_a_mqa.weight", _matrix(rng, rank + rope, h))
        kv_b = _matrix(rng, H, nope + v, rank)  # kv_b_proj per head: key rows, then value rows
        quantized(f"{b}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)))
        quantized(f"{b}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:]))
        quantized(f"{b}.attn_output.weight", _matrix(rng, h, H * v))
        if n < spec.first_dense:
            quantized(f"{b}.ffn_gate.weight", _matrix(rng, spec.dense_intermediate, h))
            quantized(f"{b}.ffn_up.weight", _matrix(rng, spec.dense_intermediate, h))
            quantized(f"{b}.ffn_down.weight", _matrix(rng, h, spec.dense_intermediate))
            continue
        plain(f"{b}.ffn_gate_inp.weight", _matrix(rng, E, h))
        plain(f"{b}.exp_probs_b.bias", np.zeros(E, np.float32))
        quantized(f"{b}.ffn_gate_exps.weight", _matrix(rng, E, inter, h))
        quantized(f"{b}.ffn_up_exps.weight", _matrix(rng, E, inter, h))
        quantized(f"{b}.ffn_down_exps.weight", _matrix(rng, E, h, inter))
        shared = inter * spec.shared_experts
        quantized(f"{b}.ffn_gate_shexp.weight", _matrix(rng, shared, h))
        quantized(f"{b}.ffn_up_shexp.weight", _matrix(rng, shared, h))
        quantized(f"{b}.ffn_down_shexp.weight", _matrix(rng, h, shared))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor as stored in a GGUF (what llama.cpp reads: it serves the stored types as they are)."""
    import gguf  # noqa: PLC0415

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
