"""The benchmark MoE model's shape, and the bytes a decode step must read: the bandwidth roof's numerator.

A mixture-of-experts token reads only its `top_k` experts of each sparse layer, so the roof is set by the ACTIVE
bytes (attention, router, norms, the chosen experts, one embedding row, the whole lm_head), not the file size.
Standard library only: the driver imports it before any system starts, and the tests check its arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar

VOCAB = 49152  # SmolLM2's tokenizer, which the GGUF carries so llama.cpp can load it


@dataclass(frozen=True, slots=True)
class MoeSpec:
    """A Qwen3-MoE shape. The default is sized for a 2-core, 24 GiB machine shared by others (docs/benchmarks.md):
    0.67 B weights (0.7 GB as Q8_0 or FP8: the experts alone are 19x the 32 MiB L3, so the 8 of 64 experts a
    token picks were almost never read by the previous token), 0.14 B of them read per token; converting on load
    goes through 2.7 GB of fp32 (the serving process peaks at about 4.6 GB), which is what caps the size."""

    ARCH: ClassVar[str] = "qwen3moe"  # its GGUF architecture (bench.moe --arch)
    TITLE: ClassVar[str] = "Qwen3-MoE"
    hidden: int = 1024
    layers: int = 6
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    num_experts: int = 64
    top_k: int = 8
    moe_intermediate: int = 512
    vocab: int = VOCAB
    context: int = 4096
    rms_eps: float = 1e-6
    rope_theta: float = 1e6

    @classmethod
    def quick(cls) -> MoeSpec:
        """A smoke-run shape (still beyond the L3 cache, but loads in seconds)."""
        return cls(layers=2, num_experts=32, moe_intermediate=256)

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)

    def params(self) -> dict[str, int]:
        """Weights by part, total (every expert) and per token (top_k experts, one embedding row, tied lm_head)."""
        h, L = self.hidden, self.layers
        attn = h * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * h
        expert = 3 * h * self.moe_intermediate
        norms = 2 * h + 2 * self.head_dim
        router = self.num_experts * h
        embed = self.vocab * h
        total = L * (attn + norms + router + self.num_experts * expert) + embed + h
        active = (
            L * (attn + norms + router + self.top_k * expert) + h + embed + h
        )  # row + lm_head + final norm
        return {"total": total, "active": active, "experts_active": L * self.top_k * expert}


@dataclass(frozen=True, slots=True)
class DeepSeekSpec:
    """A DeepSeek-V3 shape (multi-head latent attention, one dense first layer, routed experts in groups of which
    the best half are eligible, one shared expert), sized like MoeSpec so the two lines compare: 0.59 B weights,
    0.147 B of them read per token. The router's selection bias is zero, so random weights route about evenly."""

    ARCH: ClassVar[str] = "deepseek2"
    TITLE: ClassVar[str] = "DeepSeek-V3"
    hidden: int = 1024
    layers: int = 6
    first_dense: int = 1
    dense_intermediate: int = 2816
    heads: int = 16
    q_lora_rank: int = 384
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    num_experts: int = 64
    top_k: int = 8
    n_group: int = 8
    topk_group: int = 4
    shared_experts: int = 1
    moe_intermediate: int = 512
    routed_scaling_factor: float = 2.5
    vocab: int = VOCAB
    context: int = 4096
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0

    @classmethod
    def quick(cls) -> DeepSeekSpec:
        return cls(layers=2, num_experts=32, moe_intermediate=256)

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)

    def params(self) -> dict[str, int]:
        """Weights by part, as MoeSpec.params (shared experts and the dense layer are read by every token)."""
        h, L, H = self.hidden, self.layers, self.heads
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        attn = (
            h * self.q_lora_rank
            + self.q_lora_rank * H * qk
            + h * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
            + H * self.v_head_dim * h
        )
        norms = 2 * h + self.q_lora_rank + self.kv_lora_rank
        expert = 3 * h * self.moe_intermediate
        sparse = L - self.first_dense
        moe_always = (
            self.num_experts * h + self.num_experts + self.shared_experts * expert
        )  # router, bias, shared
        embed = self.vocab * h
        common = L * (attn + norms) + self.first_dense * 3 * h * self.dense_intermediate + sparse * moe_always
        total = common + sparse * self.num_experts * expert + embed + h
        active = common + sparse * self.top_k * expert + h + embed + h
        return {"total": total, "active": active, "experts_active": sparse * self.top_k * expert}


ARCHES = {shape.ARCH: shape for shape in (MoeSpec, DeepSeekSpec)}  # GGUF architecture -> the bench's shape


def distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected experts a layer touches for `tokens` tokens routed uniformly at random (each token picks
    `top_k` distinct ones): E * (1 - (1 - k/E)^T). Random weights route close to uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


_EXPERT_HF = re.compile(r"\.mlp\.experts\.\d+\.")
_EXPERT_GGUF = re.compile(r"\.ffn_(gate|up|down|gate_up)_exps\.")


def active_bytes(
    tensor_bytes: Mapping[str, int], *, num_experts: int, top_k: int, vocab: int, tokens: int = 1
) -> dict[str, float]:
    """Bytes one decode step reads for `tokens` sequences, by part, from the bytes of each stored tensor.

    Names may be Hugging Face's (`model.layers.3.mlp.experts.17.down_proj.weight`, `lm_head.weight`) or GGUF's
    (`blk.3.ffn_down_exps.weight` with all experts stacked, `output.weight`): expert tensors count
    distinct_experts(E, k, tokens) / E of their bytes; the embedding counts `tokens` rows; the lm_head is read
    whole, and where there is none (tied) the embedding matrix is read whole as the lm_head. Everything else
    (attention, norms, router) is read once per step whatever the batch.
    """
    share = distinct_experts(num_experts, top_k, tokens) / num_experts
    parts = {"attention+norms+router": 0.0, "experts": 0.0, "embedding_rows": 0.0, "lm_head": 0.0}
    embedding = lm_head = None
    for name, nbytes in tensor_bytes.items():
        if _EXPERT_HF.search(name) or _EXPERT_GGUF.search("." + name):
            parts["experts"] += nbytes * share
        elif name.startswith(("model.embed_tokens", "token_embd")):
            embedding = nbytes
        elif name.startswith(("lm_head", "output.")):
            lm_head = nbytes
        else:
            parts["attention+norms+router"] += nbytes
    if embedding is None:
        raise ValueError("no embedding tensor (model.embed_tokens or token_embd) among the tensors")
    parts["embedding_rows"] = embedding / vocab * min(tokens, vocab)
    parts["lm_head"] = float(lm_head if lm_head is not None else embedding)
    parts["total"] = sum(parts.values())
    return parts
