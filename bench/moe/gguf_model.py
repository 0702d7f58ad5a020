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

from bench.moe.spec import MoeSpec

SEED = 0
GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output")


def file_name(spec: MoeSpec, seed: int = SEED) -> str:
    """A name that changes with anything that changes the file, so a cached copy is reused only when equal."""
    key = json.dumps({"spec": spec.as_dict(), "seed": seed, "version": 1}, sort_keys=True)
    return f"qwen3moe-random-{hashlib.sha256(key.encode()).hexdigest()[:12]}.Q8_0.gguf"


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


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor as stored in a GGUF (what llama.cpp reads: it serves the stored types as they are)."""
    import gguf  # noqa: PLC0415

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
