"""Quantisation as a module swap (gpt-fast style): `PackedLinear` replaces `nn.Linear`, the model code is unchanged.

`quantize_model(model, format, policy)` walks the module tree and swaps every `nn.Linear` the `QuantPolicy`
allows. By default embeddings, the output head (`lm_head`), norms and MoE routers stay in 16 bits, as in
DeepSeek-V3's FP8 checkpoints (README_WEIGHTS.md); `QuantPolicy(keep=...)` overrides that with fnmatch patterns
on qualified module names. `PackedLinear.forward` uses a fused kernel from `cumulo.formats.kernels` when one is
registered for the input's device and the weight's format, else dequantizes and multiplies (the reference).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.errors import FormatError
from cumulo.formats.kernels import BoundKernel, find_kernel
from cumulo.formats.packed import PackedWeight
from cumulo.formats.quantize import quantize
from cumulo.platform.base import LinearFn

HEAD_PATTERNS = ("*lm_head*", "output")  # the output head: HF's lm_head, GGUF's output
DEFAULT_KEEP = ("*embed*", *HEAD_PATTERNS, "*norm*", "*.gate", "*router*")
HEAD_CHOICES = ("bf16", "body")
# The output head's default per format (`--head`); see default_head.
_HEAD_DEFAULTS: dict[str, str] = {}


def default_head(format: str) -> str:
    """Whether the output head stays in 16 bits ("bf16") or takes the body's format ("body") by default."""
    return _HEAD_DEFAULTS.get(format, "bf16")


@dataclass(frozen=True, slots=True)
class QuantPolicy:
    """Which weights to quantize, by qualified module name (e.g. `model.layers.0.self_attn.q_proj`)."""

    keep: tuple[str, ...] = DEFAULT_KEEP  # patterns left in 16 bits
    only: tuple[str, ...] = ()  # when set, quantize only names matching one of these

    def quantizes(self, name: str) -> bool:
        if any(fnmatchcase(name, p) for p in self.keep):
            return False
        return not self.only or any(fnmatchcase(name, p) for p in self.only)

    @classmethod
    def from_patterns(
        cls, keep: Iterable[str] | None = None, only: Iterable[str] | None = None, head: str = "bf16"
    ) -> QuantPolicy:
        """`head` applies to the default keep list: "body" quantizes the output head with the rest."""
        if head not in HEAD_CHOICES:
            raise FormatError(f"unknown head policy {head!r}; choose one of {', '.join(HEAD_CHOICES)}")
        if keep is None:
            keep = [p for p in DEFAULT_KEEP if head == "bf16" or p not in HEAD_PATTERNS]
        return cls(tuple(keep), tuple(only or ()))

    @classmethod
    def for_format(cls, format: str) -> QuantPolicy:
        """The default policy with `format`'s default head."""
        return cls.from_patterns(head=default_head(format))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held packed; the packed tensors are buffers, so `.to(device)` moves them."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.format = weight.format
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("tensor_scale", weight.tensor_scale)
        self.block_override = weight.block_override
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._bound: dict[str, BoundKernel | None] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str, name: str = "weight") -> PackedLinear:
        packed = quantize(linear.weight.detach(), format, name=name)
        return cls(packed, linear.bias)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.format,
            self.codes,
            self.scales,
            (self.out_features, self.in_features),
            self.tensor_scale,
            self.block_override,
        )

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self._bound = {}  # buffers may have moved: bind kernels again
        return super()._apply(fn, recurse)

    def _kernel(self, device_type: str) -> BoundKernel | None:
        """The fused kernel bound to this weight, looked up once per device type (the lookup costs µs)."""
        if device_type not in self._bound:
            binder = find_kernel(device_type, self.format)
            self._bound[device_type] = binder(self.packed) if binder is not None else None
        return self._bound[device_type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose: a decode step calls this a few hundred times, so microseconds add up.
        device = "cpu" if x.is_cpu else x.device.type
        kernel = self._bound[device] if device in self._bound else self._kernel(device)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = kernel(x2) if kernel is not None else None
        if y is None:
            y = F.linear(x2, self.packed.dequantize(x.dtype))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def fp32_logits(self, x: torch.Tensor, refine: int = 8) -> torch.Tensor | None:
        """Logits for a packed output head: fp32 inputs go through the kernel as they are (None: its outputs are
        already fp32); for 16-bit x the kernel's rounded outputs are kept except the `refine` largest per row,
        recomputed in fp32 from their dequantized rows, as `cumulo.models.layers.lm_logits` does for a dense
        head (16-bit logits near 25 step by 0.125, enough to swap the top two tokens)."""
        if x.dtype == torch.float32 or x.dim() != 2 or self.out_features <= refine:
            return None
        logits = self(x).float()
        top = logits.topk(refine, dim=-1).indices  # [T, refine]
        rows = self.packed.dequantize_rows(top.reshape(-1)).view(*top.shape, self.in_features)
        exact = torch.bmm(rows, x.float().unsqueeze(-1)).squeeze(-1)  # [T, refine]
        if self.bias is not None:
            exact = exact + self.bias.float()[top]
        return logits.scatter_(1, top, exact)

    def graph_op(self, x: torch.Tensor, y: torch.Tensor) -> tuple[int, list[int]] | None:
        """The recorded form of `y = self(x)` for a decode graph (cumulo.platform.kernels.graph), or None where
        this weight's kernel has none (no fused kernel on x's device, a bias, too many rows)."""
        kernel = self._kernel(x.device.type)
        op = getattr(kernel, "graph_op", None)
        return None if op is None or self.bias is not None else op(x, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class DenseLinear(nn.Module):
    """nn.Linear whose small-batch products go to a platform kernel (`Platform.dense_linear`), else F.linear.

    It keeps the original `weight` Parameter (no copy), so tied embeddings stay tied and code that reads
    `lm_head.weight` still works. The kernel returns None for inputs it does not take (too many rows, wrong
    dtype or device) and F.linear answers those.
    """

    def __init__(self, linear: nn.Linear, kernel: LinearFn) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self.kernel(x2, self.weight, self.bias)
        if y is None:
            return F.linear(x, self.weight, self.bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def fp32_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """x W^T + b accumulated and returned in fp32 (no 16-bit rounding of the outputs), or None when the
        kernel does not take x. Output heads use it: see `cumulo.models.layers.lm_logits`."""
        if not getattr(self.kernel, "fp32_out", False):  # the kernel has no fp32 outputs
            return None
        return self.kernel(x, self.weight, self.bias, out_dtype=torch.float32)  # type: ignore[call-arg]

    def graph_op(self, x: torch.Tensor, y: torch.Tensor) -> tuple[int, list[int]] | None:
        """The recorded form of `y = self(x)` (cumulo.platform.kernels.graph), or None where the kernel has none."""
        op = getattr(self.kernel, "graph_op", None)
        return None if op is None else op(x, self.weight, self.bias, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=platform"


def use_dense_kernel(model: nn.Module, kernel: LinearFn) -> nn.Module:
    """Swap every plain `nn.Linear` of `model` for a `DenseLinear` using `kernel`, in place; returns `model`."""
    for name, linear in [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]:
        _replace(model, name, DenseLinear(linear, kernel))
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` (e.g. `model.layers.0.mlp.down_proj`) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, format: str, policy: QuantPolicy | None = None) -> nn.Module:
    """Swap the allowed `nn.Linear`s of `model` for `PackedLinear`s in place; returns `model`."""
    policy = policy or QuantPolicy.for_format(format)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and policy.quantizes(name)
    ]
    for name, linear in targets:
        _replace(model, name, PackedLinear.from_linear(linear, format, name=f"{name}.weight"))
    return model
