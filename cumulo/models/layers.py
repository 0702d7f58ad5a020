"""Building blocks shared by every architecture: norms, rotary embeddings, gated MLP, paged attention.

Inputs are flattened across the batch ("varlen"): `x` is [T, hidden] where T is the number of tokens this step
schedules over all sequences. `AttentionContext` says which tokens belong to which sequence and where their keys
and values live in the paged KV cache; `cumulo.models.attention` does the cache reads and writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.models.attention import AttentionContext, paged_attention
from cumulo.models.config import ModelConfig

REFINE_TOP = 8


def lm_logits(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits from the output head.

    A 16-bit matmul rounds its output to 16 bits: at logit values near 25 that is a step of 0.125, enough to tie
    or swap the top two tokens of a confident model (SmolLM2 answering "What is the capital of France?" in bf16
    picked "L'" over "The" this way). So the few leading candidates of each row are recomputed exactly in fp32;
    the rest of the distribution keeps its 16-bit values, which only sampling from the tail can notice.
    A head whose kernel accumulates and returns fp32 (`DenseLinear.fp32_logits`) needs none of this.
    """
    fp32_logits = getattr(lm_head, "fp32_logits", None)  # a platform kernel that never rounds to 16 bits
    if fp32_logits is not None and hidden.dim() == 2:
        exact = fp32_logits(hidden)
        if exact is not None:
            return exact
    logits = lm_head(hidden).float()
    weight = getattr(lm_head, "weight", None)
    if (
        hidden.dtype == torch.float32
        or not isinstance(weight, torch.Tensor)
        or logits.shape[-1] <= REFINE_TOP
    ):
        return logits
    top = logits.topk(REFINE_TOP, dim=-1).indices  # [N, k]
    exact = torch.bmm(weight[top].float(), hidden.float().unsqueeze(-1)).squeeze(-1)  # [N, k]
    return logits.scatter_(1, top, exact)


class RMSNorm(nn.Module):
    """RMSNorm; `offset=1.0` gives Gemma's x * (1 + w) convention, so checkpoints load unchanged."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    # A platform's one-call RMSNorm (Platform.rms_norm), set by the engine: (x, weight, eps, offset) -> y or None.
    kernel: Callable[..., torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = self.kernel(x, self.weight, self.eps, self.offset)
            if y is not None:
                return y
        # The fused kernel accumulates in fp32 for 16-bit inputs. Gemma's offset is folded in once, lazily.
        if self.offset:
            if getattr(self, "_folded", None) is None or self._folded[0] is not self.weight:
                self._folded = (self.weight, (self.weight.float() + self.offset).to(self.weight.dtype))
            weight = self._folded[1]
        else:
            weight = self.weight
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), self.eps)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.x frequency scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp between."""
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (no change when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(
    inv_freq: torch.Tensor, scaling: dict, head_dim: int, base: float, max_positions: int
) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): frequencies that turn fewer than `beta_slow` times over the original context
    are slowed by `factor`, those that turn more than `beta_fast` times are kept, a linear ramp between.
    Returns the frequencies and the factor cos and sin are multiplied by (Hugging Face's `attention_factor`)."""
    original = scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor") or max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(
        rotations: float,
    ) -> float:  # the rotary dimension that turns `rotations` times over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (fast dims), 0: slowed by factor
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def yarn_softmax_scale(scaling: dict | None) -> float:
    """The factor DeepSeek's MLA multiplies its softmax scale by under YaRN: mscale(factor, mscale_all_dim)^2,
    which scales the non-rotary dimensions of q.k too (transformers' `yarn_apply_mscale`); 1 otherwise."""
    scaling = scaling or {}
    if scaling.get("rope_type", scaling.get("type")) in (None, "default") or not scaling.get(
        "mscale_all_dim"
    ):
        return 1.0
    m = _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
    return m * m


class RotaryEmbedding(nn.Module):
    """RoPE with a precomputed cos/sin table indexed by position. Rotate-half pairs (i, i + d/2) by default
    (Hugging Face layout); `interleaved` pairs (2i, 2i + 1) as DeepSeek's checkpoints do, and returns the
    rotated halves side by side as transformers does (q and k alike, so their dot products are unchanged)."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        scaling: dict | None = None,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        # Built on the CPU explicitly so the tables are real even when the model is constructed on `meta`.
        steps = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu")
        inv_freq = 1.0 / (base ** (steps / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        attention_factor = 1.0
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
        elif rope_type == "linear":
            inv_freq = inv_freq / (scaling or {})["factor"]
        elif rope_type == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(
                inv_freq, scaling or {}, head_dim, base, max_positions
            )
        t = torch.arange(max_positions, dtype=torch.float64, device="cpu")
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", (freqs.cos() * attention_factor).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attention_factor).float(), persistent=False)
        self.interleaved = interleaved

        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Every layer of a step passes the same positions tensor: look the rows up once per step, in the
        # activations' dtype (as Hugging Face does, so 16-bit models round the same way).
        if self._step is None or self._step[0] is not positions or self._step[1].dtype != dtype:
            cos = self.cos[positions].unsqueeze(1).to(dtype)
            sin = self.sin[positions].unsqueeze(1).to(dtype)
            self._step = (positions, cos, sin)
        return self._step[1], self._step[2]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim] -> rotated copy."""
        cos, sin = self._table(positions, x.dtype)  # [T, 1, head_dim/2]
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if self.interleaved else x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if self.act in ("gelu_pytorch_tanh", "gelu_tanh"):
            gate = F.gelu(gate, approximate="tanh")
        elif self.act == "gelu":
            gate = F.gelu(gate)
        else:
            gate = F.silu(gate)
        return self.down_proj(gate * up)


class Attention(nn.Module):
    """Grouped-query attention over the paged KV cache, with q/k/v fused into one projection.

    Options cover the families: `qkv_bias` (Qwen2), `qk_norm` (Qwen3, Gemma 3), `sliding_window` (Gemma 3 local
    layers), `scale` (Gemma 3's query_pre_attn_scalar).
    """

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        *,
        qkv_bias: bool = False,
        qk_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.rotary = rotary
        self.q_norm = qk_norm
        self.k_norm = k_norm
        self.scale = scale if scale is not None else head_dim**-0.5
        self.sliding_window = sliding_window

    # A platform's one-call rotary + KV-cache write (Platform.rope_and_cache), set by the engine.
    rope_cache: Callable[..., torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        normed = False
        if self.rope_cache is not None and ctx.kv_cache is not None and not self.rotary.interleaved:
            if self.q_norm is not None and self.k_norm is not None:
                qkv, normed = self.norm_qk_heads(qkv), True
            cache = ctx.kv_cache
            q = self.rope_cache(
                qkv, positions, self.rotary.cos, self.rotary.sin, cache.k[self.layer_idx],
                cache.v[self.layer_idx], ctx.slot_mapping, self.num_heads, self.num_kv_heads,
            )  # fmt: skip
            if q is not None:  # k and v are in the cache now
                out = paged_attention(q, None, None, ctx, self.layer_idx, self.scale, self.sliding_window)
                return self.o_proj(out.reshape(T, self.q_size))
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None and not normed:
            q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.rotary(positions, self.q_norm(q.view(T, self.num_heads, self.head_dim)))
            k = self.rotary(positions, self.k_norm(k.view(T, self.num_kv_heads, self.head_dim)))
        else:  # no per-head norms, or done above (the rotary kernel declined the step)
            # q and k heads side by side: one rotary pass over both
            qk = qkv[:, : self.q_size + self.kv_size].view(
                T, self.num_heads + self.num_kv_heads, self.head_dim
            )
            q, k = self.rotary(positions, qk).split([self.num_heads, self.num_kv_heads], dim=1)
        out = paged_attention(q, k, v, ctx, self.layer_idx, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(T, self.q_size))

    def norm_qk_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """[q | k | v] rows with each q and k head RMS-normalised (Qwen3, Gemma 3), as one contiguous tensor the
        rotary kernel reads. The heads go to the norm as contiguous rows of head_dim, so a platform's norm
        kernel takes them (a decode graph normalises the same rows in place with the same kernel)."""
        assert self.q_norm is not None and self.k_norm is not None
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(T * self.num_heads, self.head_dim)).view(T, self.q_size)
        k = self.k_norm(k.reshape(T * self.num_kv_heads, self.head_dim)).view(T, self.kv_size)
        return torch.cat((q, k, v), dim=-1)


class CausalLM(nn.Module):
    """A decoder stack (`model_class`, set by each architecture) under an output head, tied or not."""

    model_class: type[nn.Module]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(self.lm_head, hidden)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits
