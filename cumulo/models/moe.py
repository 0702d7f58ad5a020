"""Mixture-of-experts compute shared by the MoE architectures (Qwen3-MoE, DeepSeek-V3): routing and experts.

A router picks `k` experts per token; `Experts` then runs each selected expert once over exactly the rows routed
to it, grouped across the whole batch, so a token reads only its experts' weights and an unselected expert is
never touched. Each expert is a plain `GatedMLP` submodule (`experts.{e}.gate_up_proj` / `.down_proj`), so a
packed checkpoint swaps in a `PackedLinear` per expert by name, exactly as for a dense model's linears.
On the CPU, up to `moe.MAX_ROWS` rows of SiLU experts in FP8, bf16 or fp32 go through one native call per layer
(`cumulo.formats.kernels.moe`); other devices, formats and prefill take the per-expert path below.
"""

from __future__ import annotations

import torch
from torch import nn

from cumulo.formats.kernels.cpu import kernel_threads
from cumulo.formats.kernels.moe import ERRORS as MOE_ERRORS
from cumulo.formats.kernels.moe import GroupedExperts, bind_experts
from cumulo.models.layers import GatedMLP
from cumulo.platform.kernels.abi import Op

_UNBOUND = object()
# Prefill GEMMs of more than BUCKET_ABOVE rows take a whole number of ROW_BUCKET rows. oneDNN (torch's bf16 GEMM
# on CPUs) keeps a primitive, with its scratch, per distinct shape; every expert's row count is a new shape, and
# after a few prefill batches those primitives held 130 MiB for a 690 MiB model (bench.moe.memory). Rounding the
# count up bounds the shapes; the extra rows are the next slots' (or zeros), computed and dropped.
BUCKET_ABOVE = 16
ROW_BUCKET = 32


def softmax_topk(
    router_logits: torch.Tensor, k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k] float32, expert ids [T, k] long), as Qwen3-MoE and Mixtral route.

    The softmax runs in float32 whatever the activations' dtype (as the reference does), over all experts,
    before the top-k; `norm_topk_prob` rescales the k kept probabilities to sum to 1.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = probs.topk(k, dim=-1)  # [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    """`num_experts` gated MLPs (gate and up fused), one submodule per expert named `{e}` under this module,
    so that inside a sparse block they read `experts.{e}.gate_up_proj` / `experts.{e}.down_proj`, as Hugging Face
    names them (after gate/up fusion).

    Which experts run, over how many rows, is decided by the router's output at run time: a recorded decode
    graph replays only the grouped kernel's path (`softmax_routed_op`), which takes the routing as data.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act = act
        self.grouped = True  # False: always the per-expert path (tests compare the two)
        self._kernel: GroupedExperts | None | object = _UNBOUND
        for e in range(num_experts):
            self.add_module(str(e), GatedMLP(hidden, intermediate, act))

    def __getitem__(self, e: int) -> nn.Module:
        return self._modules[str(e)]  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.num_experts

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self._kernel = _UNBOUND  # weights may have moved: gather their addresses again
        return super()._apply(fn, recurse)

    def grouped_kernel(self) -> GroupedExperts | None:
        """The one-call kernel over these experts, bound on first use (after the checkpoint's linears are in
        place), or None where it cannot take them."""
        if self._kernel is _UNBOUND:
            kernel = None
            if self.act == "silu":
                mlps = [self[e] for e in range(self.num_experts)]
                kernel = bind_experts([m.gate_up_proj for m in mlps], [m.down_proj for m in mlps])
            self._kernel = kernel
        return self._kernel  # type: ignore[return-value]

    def softmax_routed(
        self, x: torch.Tensor, router_logits: torch.Tensor, k: int, norm_topk_prob: bool
    ) -> torch.Tensor:
        """`self(x, *softmax_topk(router_logits, k, norm_topk_prob))`: on the kernel's path routing and experts
        are one call (four fewer torch operators per layer)."""
        if self.grouped and x.is_cpu:
            kernel = self.grouped_kernel()
            y = kernel.softmax_topk(x, router_logits, k, norm_topk_prob) if kernel is not None else None
            if y is not None:
                return y
        return self(x, *softmax_topk(router_logits, k, norm_topk_prob))

    def sigmoid_routed(self, x: torch.Tensor, router: nn.Module) -> torch.Tensor:
        """`self(x, *router(x))` for DeepSeek-V3's router (`models.deepseek.DeepseekRouter`: `logits(x)` fp32,
        `select(logits)`, and its settings): on the kernel's path the sigmoid, the bias, the group limit, the
        top-k and the scaling run in the experts' call."""
        logits = router.logits(x)
        if self.grouped and x.is_cpu:
            kernel = self.grouped_kernel()
            y = None
            if kernel is not None:
                y = kernel.sigmoid_topk(
                    x, logits, router.e_score_correction_bias.detach().float(), router.top_k, router.n_group,
                    router.topk_group, router.norm_topk_prob, router.routed_scaling_factor,
                )  # fmt: skip
            if y is not None:
                return y
        return self(x, *router.select(logits))

    def softmax_routed_op(
        self, x: torch.Tensor, router_logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
        y: torch.Tensor, k: int, norm_topk_prob: bool,
    ) -> tuple[Op, dict[int, str]] | None:  # fmt: skip
        """The recorded form of `y = self.softmax_routed(x, router_logits, k, norm_topk_prob)` for a decode graph
        (cumulo.engine.decode_graph), with its error messages: the kernel's path, over fixed buffers (ids [T, k]
        int64 and weights [T, k] fp32 receive the routing). None where that path does not take them: the
        routing and the expert rows are data, not shapes, so any choice of experts replays the same op."""
        kernel = self.grouped_kernel() if self.grouped else None
        if kernel is None:
            return None
        op = kernel.graph_op(x, router_logits, ids, weights, y, k, norm_topk_prob, kernel_threads())
        return None if op is None else (op, MOE_ERRORS)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.grouped and x.is_cpu:
            kernel = self.grouped_kernel()
            y = kernel(x, weights, ids) if kernel is not None else None
            if y is not None:
                return y
        return self.per_expert(x, weights, ids)

    def per_expert(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k] (any float dtype), ids [T, k] -> sum over k of weight * expert(x), [T, H].

        The k outputs of each token are gathered back into token order and summed in one weighted reduction,
        not scattered per expert: `index_add_` opens a parallel region even for one row, and on a CPU whose
        cores are shared each such region can cost milliseconds (bench/moe/experts.py measured 8 per layer
        at decode). A decode step now runs the experts' own matmuls and five small ops per layer.
        """
        T, k = ids.shape
        flat_ids = ids.reshape(-1)  # [T*k], slot i belongs to token i // k
        order = flat_ids.argsort(stable=True)  # slots grouped by expert, in token order within an expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync per layer
        # [T*k (+ ROW_BUCKET - 1 zero rows), H]: each token's row once per expert it chose
        rows = x.new_zeros(T * k + (ROW_BUCKET - 1 if T * k > BUCKET_ABOVE else 0), x.shape[1])
        torch.index_select(x, 0, order // k, out=rows[: T * k])
        outputs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            m = (
                n if n <= BUCKET_ABOVE else -(-n // ROW_BUCKET) * ROW_BUCKET
            )  # the next rows: other slots or 0
            outputs.append(self[e](rows[start : start + m])[:n])  # [n, H]
            start += n
        by_slot = torch.cat(outputs).index_select(0, order.argsort())  # [T*k, H] back in (token, j) order
        slot_weights = weights.to(x.dtype).unsqueeze(-1)  # [T, k, 1]
        return (by_slot.view(T, k, -1) * slot_weights).sum(dim=1)  # [T, H]
