"""LoRA over Cumulo's own modules: the linears that serve are the linears that train.

Cumulo fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; an adapter still has one (A, B) pair per
original projection (PEFT's and every other tool's layout), applied to its slice of the fused output rows. The
base stays frozen and may be packed (`PackedLinear`, QLoRA-style): while gradients are on it is dequantized per
matmul so gradients reach earlier layers through it; only A and B train.

y = base(x) + (alpha / r) * x A^T B^T per slice, A [r, in] (Kaiming-uniform, as PEFT), B [out, r] (zero).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.engine.lora import FUSED  # fused module -> its parts in row order, as the registry fuses them
from cumulo.errors import InvalidRequest
from cumulo.formats.linear import DenseLinear, PackedLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEARS = (nn.Linear, PackedLinear, DenseLinear)


@dataclass(frozen=True)
class Slice:
    name: str  # the original projection (q_proj ...): the adapter's module name
    start: int  # its first output row in the fused base
    size: int


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen base's product. A packed base's fused kernel has no backward, so with gradients on it is
    dequantized for this one matmul (and freed after it)."""
    if isinstance(base, PackedLinear) and torch.is_grad_enabled():
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return F.linear(x, base.packed.dequantize(x.dtype), bias)
    return base(x)


class LoRALinear(nn.Module):
    """A frozen base linear plus one low-rank update per slice of its output rows (none: a packed base that
    only needs its differentiable path)."""

    def __init__(self, base: nn.Module, slices: list[Slice], rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slices = slices
        self.rank = rank
        self.scale = alpha / rank
        dtype = torch.float32
        self.lora_A = nn.ParameterDict(
            {s.name: nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype)) for s in slices}
        )
        self.lora_B = nn.ParameterDict(
            {s.name: nn.Parameter(torch.zeros(s.size, rank, dtype=dtype)) for s in slices}
        )
        self.merged = False
        self.enabled = True  # False: the base alone (DPO's reference model, see adapters_off)

    def reset(self, generator: torch.Generator) -> None:
        """PEFT's default init: A Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(in)), B zero."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for a in self.lora_A.values():
                a.copy_(torch.rand(a.shape, generator=generator) * 2 * bound - bound)
            for b in self.lora_B.values():
                b.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] -> [T, out]: the adapter's contribution, zero on rows no slice covers."""
        pieces, at = [], 0
        for s in self.slices:
            if s.start > at:
                pieces.append(x.new_zeros(*x.shape[:-1], s.start - at))
            a, b = self.lora_A[s.name], self.lora_B[s.name]
            pieces.append((x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * self.scale)  # [T, r] -> [T, size]
            at = s.start + s.size
        if at < self.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], self.out_features - at))
        return torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_forward(self.base, x)
        if self.merged or not self.slices or not self.enabled:
            return y
        return y + self.delta(x)

    def merge(self) -> None:
        """W[slice] += scale * B @ A, in place: serving without the extra matmuls. Dense bases only."""
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise InvalidRequest("an adapter cannot be merged into a packed base; serve it unmerged")
        with torch.no_grad():
            for s in self.slices:
                update = (self.lora_B[s.name] @ self.lora_A[s.name]) * self.scale
                weight[s.start : s.start + s.size] += update.to(weight.dtype)
        self.merged = True


def _slices_of(name: str, base: nn.Module, model: nn.Module, targets: tuple[str, ...]) -> list[Slice]:
    """The targeted original projections inside the Cumulo linear called `name`."""
    child = name.rpartition(".")[2]
    if child not in FUSED:
        return [Slice(child, 0, base.out_features)] if child in targets else []
    if child == "qkv_proj":
        attn = model.get_submodule(name.rpartition(".")[0])
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
    else:
        sizes = [base.out_features // 2] * 2
    out, start = [], 0
    for part, size in zip(FUSED[child], sizes, strict=True):
        if part in targets:
            out.append(Slice(part, start, size))
        start += size
    return out


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    generator: torch.Generator | None = None,
) -> dict[str, LoRALinear]:
    """Wrap `model`'s targeted linears in place (decoder layers only: never the output head or embeddings;
    MoE experts are left out: their adapters have no common on-disk layout yet). Returns {Cumulo module name:
    wrapper}; the model's own parameters are frozen, the adapters' are the only trainable ones."""
    if rank < 1:
        raise InvalidRequest(f"LoRA rank must be at least 1, got {rank}")
    unknown = set(targets) - set(DEFAULT_TARGETS)
    if unknown:
        raise InvalidRequest(f"unknown LoRA target module {sorted(unknown)[0]!r}")
    model.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LINEARS) or ".layers." not in f".{name}" or ".experts." in name:
            continue
        slices = _slices_of(name, module, model, targets)
        if not slices and not isinstance(module, PackedLinear):
            continue
        wrapper = LoRALinear(module, slices, rank, alpha)
        if generator is not None:
            wrapper.reset(generator)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
        wrapped[name] = wrapper
    if not any(w.slices for w in wrapped.values()):
        raise InvalidRequest(f"no linear of this model matches the LoRA targets {list(targets)}")
    return wrapped


@contextmanager
def adapters_off(wrapped: dict[str, LoRALinear]) -> Iterator[None]:
    """The frozen base model, for as long as the block runs: every (unmerged) adapter is skipped."""
    for w in wrapped.values():
        w.enabled = False
    try:
        yield
    finally:
        for w in wrapped.values():
            w.enabled = True


def lora_parameters(wrapped: dict[str, LoRALinear]) -> list[nn.Parameter]:
    """The trainable tensors, in a fixed order (module name, then slice order, A before B)."""
    params = []
    for name in sorted(wrapped):
        w = wrapped[name]
        for s in w.slices:
            params += [w.lora_A[s.name], w.lora_B[s.name]]
    return params


def peft_name(cumulo_name: str, part: str) -> str:
    """`model.layers.0.self_attn.qkv_proj` + `q_proj` -> PEFT's module path for the original projection."""
    return f"base_model.model.{cumulo_name.rpartition('.')[0]}.{part}"
