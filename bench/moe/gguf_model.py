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
    return f"{spec.ARCH}-random-{hashlib.sha256(key.encode()).hexdigest()[:12]}.Q8_0.gguf"


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


class _File:
    """A bench GGUF written through a .part file (an interrupted run leaves no half file): the metadata both
    architectures share, the source's tokenizer, Q8_0 matrices and f32 vectors; `close` renames it into place."""

    def __init__(self, path: Path, spec: MoeSpec | DeepSeekSpec, tokenizer_gguf: Path) -> None:
        import gguf  # noqa: PLC0415

        self.gguf, self.path, self.tmp = gguf, path, path.with_suffix(".part")
        w = self.writer = gguf.GGUFWriter(str(self.tmp), spec.ARCH)
        w.add_name(f"cumulo bench random {spec.ARCH}")
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_context_length(spec.context)
        w.add_embedding_length(spec.hidden)
        w.add_block_count(spec.layers)
        w.add_head_count(spec.heads)
        w.add_layer_norm_rms_eps(spec.rms_eps)
        w.add_rope_freq_base(spec.rope_theta)
        w.add_expert_count(spec.num_experts)
        w.add_expert_used_count(spec.top_k)
        w.add_expert_feed_forward_length(spec.moe_intermediate)
        w.add_expert_weights_norm(True)
        vocab = _copy_tokenizer(w, tokenizer_gguf)
        if vocab != spec.vocab:
            raise ValueError(f"{tokenizer_gguf} has {vocab} tokens, the spec says {spec.vocab}")

    def quantized(self, name: str, weights: np.ndarray) -> None:
        q8 = self.gguf.GGMLQuantizationType.Q8_0
        self.writer.add_tensor(name, self.gguf.quants.quantize(weights, q8), raw_dtype=q8)

    def plain(self, name: str, weights: np.ndarray) -> None:
        self.writer.add_tensor(name, weights.astype(np.float32))

    def close(self) -> Path:
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_tensors_to_file()
        self.writer.close()
        self.tmp.rename(self.path)
        return self.path


def write_moe_gguf(spec: MoeSpec, path: Path, tokenizer_gguf: Path, seed: int = SEED) -> Path:
    """Writes the Qwen3-MoE to `path`."""
    f = _File(path, spec, tokenizer_gguf)
    f.writer.add_feed_forward_length(spec.moe_intermediate)
    f.writer.add_head_count_kv(spec.kv_heads)
    f.writer.add_key_length(spec.head_dim)
    f.writer.add_value_length(spec.head_dim)
    rng = np.random.default_rng(seed)
    h, hd, E, inter = spec.hidden, spec.head_dim, spec.num_experts, spec.moe_intermediate
    f.quantized("token_embd.weight", _matrix(rng, spec.vocab, h))  # tied: both engines reuse it as lm_head
    f.plain("output_norm.weight", np.ones(h, np.float32))
    for n in range(spec.layers):
        b = f"blk.{n}"
        f.plain(f"{b}.attn_norm.weight", np.ones(h, np.float32))
        f.plain(f"{b}.ffn_norm.weight", np.ones(h, np.float32))
        f.plain(f"{b}.attn_q_norm.weight", np.ones(hd, np.float32))
        f.plain(f"{b}.attn_k_norm.weight", np.ones(hd, np.float32))
        f.quantized(f"{b}.attn_q.weight", _matrix(rng, spec.heads * hd, h))
        f.quantized(f"{b}.attn_k.weight", _matrix(rng, spec.kv_heads * hd, h))
        f.quantized(f"{b}.attn_v.weight", _matrix(rng, spec.kv_heads * hd, h))
        f.quantized(f"{b}.attn_output.weight", _matrix(rng, h, spec.heads * hd))
        f.plain(
            f"{b}.ffn_gate_inp.weight", _matrix(rng, E, h)
        )  # the router: f32, as llama-quantize leaves it
        f.quantized(f"{b}.ffn_gate_exps.weight", _matrix(rng, E, inter, h))  # [E, out, in] in torch order
        f.quantized(f"{b}.ffn_up_exps.weight", _matrix(rng, E, inter, h))
        f.quantized(f"{b}.ffn_down_exps.weight", _matrix(rng, E, h, inter))
    return f.close()


def write_deepseek2_gguf(spec: DeepSeekSpec, path: Path, tokenizer_gguf: Path, seed: int = SEED) -> Path:
    """A seeded random DeepSeek-V3 laid out as llama.cpp's converter writes a `deepseek2` (metadata keys and
    tensor names of its conversion/deepseek.py): MLA as one key/value head kv_lora_rank + rope wide with the
    per-head widths under *_length_mla, kv_b_proj stored as attn_k_b [H, rank, nope] and attn_v_b [H, v, rank]
    (torch order), stacked routed experts, shared experts as *_shexp, the selection bias as exp_probs_b.bias.
    Matrices are Q8_0; norms, the router and its bias f32."""
    import gguf  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from cumulo.models.gguf import split_kv_b  # noqa: PLC0415

    f = _File(path, spec, tokenizer_gguf)
    w = f.writer
    w.add_feed_forward_length(spec.dense_intermediate)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(spec.qk_rope_head_dim)
    w.add_q_lora_rank(spec.q_lora_rank)
    w.add_kv_lora_rank(spec.kv_lora_rank)
    w.add_key_length(spec.kv_lora_rank + spec.qk_rope_head_dim)
    w.add_value_length(spec.kv_lora_rank)
    w.add_key_length_mla(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    w.add_value_length_mla(spec.v_head_dim)
    w.add_leading_dense_block_count(spec.first_dense)
    w.add_expert_shared_count(spec.shared_experts)
    w.add_expert_weights_scale(spec.routed_scaling_factor)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(spec.n_group)
    w.add_expert_group_used_count(spec.topk_group)
    rng = np.random.default_rng(seed)
    h, H, E, inter = spec.hidden, spec.heads, spec.num_experts, spec.moe_intermediate
    nope, rope, v, rank = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    f.quantized("token_embd.weight", _matrix(rng, spec.vocab, h))  # tied
    f.plain("output_norm.weight", np.ones(h, np.float32))
    for n in range(spec.layers):
        b = f"blk.{n}"
        f.plain(f"{b}.attn_norm.weight", np.ones(h, np.float32))
        f.plain(f"{b}.ffn_norm.weight", np.ones(h, np.float32))
        f.plain(f"{b}.attn_q_a_norm.weight", np.ones(spec.q_lora_rank, np.float32))
        f.plain(f"{b}.attn_kv_a_norm.weight", np.ones(rank, np.float32))
        f.quantized(f"{b}.attn_q_a.weight", _matrix(rng, spec.q_lora_rank, h))
        f.quantized(f"{b}.attn_q_b.weight", _matrix(rng, H * (nope + rope), spec.q_lora_rank))
        f.quantized(f"{b}.attn_kv_a_mqa.weight", _matrix(rng, rank + rope, h))
        kv_b = _matrix(rng, H, nope + v, rank)  # kv_b_proj per head: key rows, then value rows
        k_b, v_b = split_kv_b(torch.from_numpy(kv_b.reshape(-1, rank)), H, nope)
        f.quantized(f"{b}.attn_k_b.weight", k_b.numpy())
        f.quantized(f"{b}.attn_v_b.weight", v_b.numpy())
        f.quantized(f"{b}.attn_output.weight", _matrix(rng, h, H * v))
        if n < spec.first_dense:
            f.quantized(f"{b}.ffn_gate.weight", _matrix(rng, spec.dense_intermediate, h))
            f.quantized(f"{b}.ffn_up.weight", _matrix(rng, spec.dense_intermediate, h))
            f.quantized(f"{b}.ffn_down.weight", _matrix(rng, h, spec.dense_intermediate))
            continue
        f.plain(f"{b}.ffn_gate_inp.weight", _matrix(rng, E, h))
        f.plain(f"{b}.exp_probs_b.bias", np.zeros(E, np.float32))
        f.quantized(f"{b}.ffn_gate_exps.weight", _matrix(rng, E, inter, h))
        f.quantized(f"{b}.ffn_up_exps.weight", _matrix(rng, E, inter, h))
        f.quantized(f"{b}.ffn_down_exps.weight", _matrix(rng, E, h, inter))
        shared = inter * spec.shared_experts
        f.quantized(f"{b}.ffn_gate_shexp.weight", _matrix(rng, shared, h))
        f.quantized(f"{b}.ffn_up_shexp.weight", _matrix(rng, shared, h))
        f.quantized(f"{b}.ffn_down_shexp.weight", _matrix(rng, h, shared))
    return f.close()


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor as stored in a GGUF (what llama.cpp reads: it serves the stored types as they are)."""
    import gguf  # noqa: PLC0415

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
