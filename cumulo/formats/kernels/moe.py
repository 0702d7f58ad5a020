"""The grouped expert kernel (cumulo/platform/kernels/moe.cpp): a sparse layer's selected experts, SiLU-gated,
weighted and summed, in one native call per layer.

`bind_experts(gate_up, down)` takes every expert's two linears (a `PackedLinear` in an FP8 format, or a plain
linear with a bf16 or fp32 `weight`), checks they share one layout, and returns a `GroupedExperts`, or None
where the kernel cannot take them (another format or device, mixed layouts, no kernel library); the caller then
keeps its per-expert path. Per-expert addresses are gathered once, into two int64 tables; the tensors behind
them are kept alive by the binding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cumulo.formats.kernels import cpu
from cumulo.formats.kernels.cpu import FP8_FORMATS, kernel_threads
from cumulo.formats.linear import PackedLinear
from cumulo.platform.kernels.abi import Kernels, Op
from cumulo.platform.kernels.build import SOURCE_DIR, KernelLibrary, requires_avx2

FP8, BF16, FP32 = 0, 1, 2
KINDS = {torch.bfloat16: BF16, torch.float32: FP32}
ERRORS = {1: "expert id out of range"}  # the kernel's return codes
SOFTMAX, SIGMOID = 0, 1  # the kernel's routers: Qwen3-MoE / Mixtral's, DeepSeek-V3's
# Above this many rows (prefill) the per-expert path's dequantize + GEMM is the better tool: the kernel
# multiplies each weight row with at most 4 rows at a time, without a GEMM's cache blocking.
MAX_ROWS = 64

_kernel = KernelLibrary(
    SOURCE_DIR / "moe.cpp",
    "grouped MoE expert kernel",
    ["cumulo_moe_experts"],
    requires=requires_avx2,
    fallback="running experts one by one",
)


def library() -> Kernels | None:
    return _kernel.get()


@dataclass
class _Table:
    """One projection across experts: addresses of each expert's weight and block scales, their block shape."""

    weights: torch.Tensor  # [E] int64 addresses
    scales: torch.Tensor  # [E] int64 addresses (zeros for 16/32-bit weights)
    block: tuple[int, int]
    kind: int
    e8m0: bool
    keep: list[torch.Tensor]


def _table(linears: Sequence[nn.Module]) -> _Table | None:
    first = linears[0]
    weights, scales, keep, layouts = [], [], [], set()
    for linear in linears:
        if isinstance(linear, PackedLinear):
            if linear.format not in FP8_FORMATS or linear.bias is not None or linear.scales is None:
                return None
            packed = linear.packed
            n, k = packed.shape
            br, bc = packed.block
            e8m0 = packed.scheme.scale.startswith("e8m0")
            codes = linear.codes.contiguous()
            sc = linear.scales.contiguous() if e8m0 else linear.scales.to(torch.float32).contiguous()
            layouts.add((FP8, e8m0, packed.shape, (br or n, bc or k), codes.device.type, sc.dtype))
            keep += [codes, sc]
            weights.append(codes.data_ptr())
            scales.append(sc.data_ptr())
        else:
            w = getattr(linear, "weight", None)
            if (
                not isinstance(w, torch.Tensor)
                or w.dtype not in KINDS
                or getattr(linear, "bias", None) is not None
            ):
                return None
            w = w.detach().contiguous()
            layouts.add((KINDS[w.dtype], False, tuple(w.shape), (1, w.shape[1]), w.device.type, w.dtype))
            keep.append(w)
            weights.append(w.data_ptr())
            scales.append(0)
    if len(layouts) != 1:
        return None
    kind, e8m0, _, block, device, _ = layouts.pop()
    if device != "cpu" or (kind == FP8 and block[1] != first.in_features and block[1] % 16):
        return None
    return _Table(torch.tensor(weights, dtype=torch.int64), torch.tensor(scales, dtype=torch.int64), block, kind,
                  e8m0, keep)  # fmt: skip


class GroupedExperts:
    """The bound kernel of one sparse layer's experts: `(x [T, H], weights [T, k], ids [T, k]) -> [T, H]`, or
    None for inputs it does not take (another dtype or device, more than MAX_ROWS rows)."""

    def __init__(self, lib: Kernels, gate_up: _Table, down: _Table, hidden: int, intermediate: int) -> None:
        self.num_experts = gate_up.weights.numel()
        self.hidden, self.intermediate = hidden, intermediate
        self.gate_up, self.down = gate_up, down
        self._call = lib.cumulo_moe_experts.partial(
            H=hidden, I=intermediate, E=self.num_experts, kind=gate_up.kind, e8m0=gate_up.e8m0,
            gate_up=gate_up.weights, gate_up_scales=gate_up.scales, gate_up_bn=gate_up.block[0],
            gate_up_bk=gate_up.block[1], down=down.weights, down_scales=down.scales, down_bn=down.block[0],
            down_bk=down.block[1],
        )  # fmt: skip

    def takes(self, x: torch.Tensor) -> bool:
        return (
            x.is_cpu
            and x.dim() == 2
            and x.dtype in KINDS
            and x.shape[0] <= MAX_ROWS
            and x.shape[1] == self.hidden
        )

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        if not self.takes(x):
            return None
        ids = ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        return self._run(x.contiguous(), weights, ids, None, False)

    def softmax_topk(
        self, x: torch.Tensor, router_logits: torch.Tensor, k: int, norm_topk_prob: bool
    ) -> torch.Tensor | None:
        """Route (as `models.moe.softmax_topk`) and run the experts in the same call; router_logits [T, E] in
        x's dtype."""
        if not self.takes(x) or router_logits.dtype != x.dtype or router_logits.shape[-1] != self.num_experts:
            return None
        T = x.shape[0]
        ids = torch.empty((T, k), dtype=torch.int64)
        weights = torch.empty((T, k), dtype=torch.float32)
        return self._run(x.contiguous(), weights, ids, router_logits.contiguous(), norm_topk_prob)

    def sigmoid_topk(
        self, x: torch.Tensor, router_logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int,
        topk_group: int, norm_topk_prob: bool, scale: float, routing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:  # fmt: skip
        """Route as DeepSeek-V3 does (`models.deepseek.DeepseekRouter`: sigmoid scores, `bias` [E] added for the
        selection only, group-limited top-k, normalised and scaled weights) and run the experts in the same call;
        router_logits [T, E] fp32 whatever x's dtype (the reference's router runs in fp32). `routing`: (ids
        [T, k] int64, weights [T, k] fp32) to receive the routing, else scratch."""
        E = self.num_experts
        if (
            not self.takes(x)
            or router_logits.dtype != torch.float32
            or router_logits.shape != (x.shape[0], E)
            or not 0 < k <= E
            or (n_group > 1 and (E % n_group or E // n_group < 2 or not 0 < topk_group <= n_group))
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (E,) or not bias.is_cpu))
        ):
            return None
        T = x.shape[0]
        ids, weights = routing or (
            torch.empty((T, k), dtype=torch.int64),
            torch.empty((T, k), dtype=torch.float32),
        )
        if (
            ids.shape != (T, k)
            or ids.dtype != torch.int64
            or weights.shape != (T, k)
            or weights.dtype != torch.float32
        ):
            return None
        bias = bias.contiguous() if bias is not None else None
        return self._run(x.contiguous(), weights, ids, router_logits.contiguous(), norm_topk_prob,
                         router=SIGMOID, bias=bias, n_group=n_group, topk_group=topk_group, scale=scale)  # fmt: skip

    def graph_op(
        self, x: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, y: torch.Tensor,
        k: int, norm_topk_prob: bool, threads: int, router: int = SOFTMAX, bias: torch.Tensor | None = None,
        n_group: int = 1, topk_group: int = 1, scale: float = 1.0,
    ) -> Op | None:  # fmt: skip
        """The recorded form of `y = self.softmax_topk(x, logits, k, norm_topk_prob)` (router=SOFTMAX, logits in
        x's dtype) or of `y = self.sigmoid_topk(x, logits, bias, k, n_group, topk_group, norm_topk_prob, scale)`
        (router=SIGMOID, logits fp32, bias [E] fp32 or None) for a decode graph (cumulo.platform.kernels.graph),
        over fixed buffers: ids [T, k] int64 and weights [T, k] fp32 receive the routing. None where the kernel
        does not take x. The caller keeps `bias` alive with the graph."""
        T, E = x.shape[0], self.num_experts
        sigmoid = router == SIGMOID
        if (
            not self.takes(x)
            or not all(t.is_contiguous() for t in (x, logits, ids, weights, y))
            or logits.dtype != (torch.float32 if sigmoid else x.dtype)
            or logits.shape != (T, E)
            or ids.shape != (T, k)
            or ids.dtype != torch.int64
            or weights.shape != (T, k)
            or weights.dtype != torch.float32
            or y.shape != x.shape
            or y.dtype != x.dtype
            or router not in (SOFTMAX, SIGMOID)
            or not 0 < k <= E
        ):
            return None
        if sigmoid and (
            (n_group > 1 and (E % n_group or E // n_group < 2 or not 0 < topk_group <= n_group))
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (E,) or not bias.is_cpu
                                      or not bias.is_contiguous()))
        ):  # fmt: skip
            return None
        if not sigmoid:
            bias, n_group, topk_group, scale = None, 1, 1, 1.0
        return self._call.op(
            x=x, T=T, k=k, ids=ids, weights=weights, logits=logits, norm_topk=norm_topk_prob, y=y,
            bf16=x.dtype == torch.bfloat16, threads=threads, wide_ok=cpu.USE_AVX512, router=router, bias=bias,
            n_group=n_group, topk_group=topk_group, scale=scale,
        )  # fmt: skip

    def _run(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        logits: torch.Tensor | None,
        norm: bool,
        router: int = SOFTMAX,
        bias: torch.Tensor | None = None,
        n_group: int = 1,
        topk_group: int = 1,
        scale: float = 1.0,
    ) -> torch.Tensor:
        y = torch.empty_like(x)
        code = self._call(
            x=x, T=x.shape[0], k=ids.shape[1], ids=ids, weights=weights, logits=logits, norm_topk=norm, y=y,
            bf16=x.dtype == torch.bfloat16, threads=kernel_threads(), wide_ok=cpu.USE_AVX512, router=router,
            bias=bias, n_group=n_group, topk_group=topk_group, scale=scale,
        )  # fmt: skip
        if code != 0:
            raise IndexError(f"expert id out of range [0, {self.num_experts}) in {ids.tolist()}")
        return y


def bind_experts(gate_up: Sequence[nn.Module], down: Sequence[nn.Module]) -> GroupedExperts | None:
    """The grouped kernel over these experts' linears (gate_up [2I, H] and down [H, I] per expert), or None."""
    lib = library()
    if lib is None or not gate_up or len(gate_up) != len(down):
        return None
    gu, dn = _table(gate_up), _table(down)
    if gu is None or dn is None or gu.kind != dn.kind or gu.e8m0 != dn.e8m0:
        return None
    hidden, intermediate = gate_up[0].in_features, down[0].in_features
    if gate_up[0].out_features != 2 * intermediate or down[0].out_features != hidden:
        return None
    return GroupedExperts(lib, gu, dn, hidden, intermediate)
