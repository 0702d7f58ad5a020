"""Building blocks shared by every architecture: norms, rotary embeddings, gated MLP, paged attention.

Inputs are flattened across the batch ("varlen"): `x` is [T, hidden] where T is the number of tokens this step
schedules over all sequences. `AttentionContext` says which tokens belong to which sequence and where their keys
and values live in the paged KV cache; `cumulo.engine.attention` does the cache reads and writes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.engine.attention import AttentionContext, paged_attention


class RMSNorm(nn.Module):
    """RMSNorm; `offset=1.0` gives Gemma's x * (1 + w) convention, so checkpoints load unchanged."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), self.eps).to(x.dtype)


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


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (Hugging Face layout) with a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        # Built on the CPU explicitly so the tables are real even when the model is constructed on `meta`.
        steps = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu")
        inv_freq = 1.0 / (base ** (steps / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
        elif rope_type == "linear":
            inv_freq = inv_freq / (scaling or {})["factor"]
        t = torch.arange(max_positions, dtype=torch.float64, device="cpu")
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Every layer of a step passes the same positions tensor: look the rows up once per step.
        if self._step is None or self._step[0] is not positions:
            self._step = (positions, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        return self._step[1], self._step[2]

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # xs: [T, heads, head_dim]; cos/sin: [T, 1, head_dim/2]
        cos, sin = self._table(positions)
        out = []
        for x in xs:
            x1, x2 = x.float().chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            out.append(rotated.to(x.dtype))
        return tuple(out)


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = paged_attention(q, k, v, ctx, self.layer_idx, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(T, self.q_size))
