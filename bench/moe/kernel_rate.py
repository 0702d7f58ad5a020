"""Read rate of one decode row through the grouped expert kernel, against the dense bf16 kernel on an lm_head-sized
matrix and a plain sum, interleaved, in thread CPU time (so the neighbours' share of the cores drops out; their share
of the memory bus does not).

    python -m bench.moe.kernel_rate [--calls 60]

The experts are bench.moe's shape (64 experts of 1024 -> 512, top 8, ue8m0-fp8, bf16 activations), four layers of
them taken in turn with fresh routing each call, so the selected experts are not in the caches from the call before.
"""

from __future__ import annotations

import argparse
import statistics
import time


def fp8_experts(spec):  # type: ignore[no-untyped-def]
    """One layer of `spec`'s experts with random weights (std 0.05), bf16, every expert's linears in ue8m0-fp8."""
    import torch  # noqa: PLC0415

    from cumulo.formats.linear import PackedLinear  # noqa: PLC0415
    from cumulo.models.moe import Experts  # noqa: PLC0415

    experts = Experts(spec.num_experts, spec.hidden, spec.moe_intermediate)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    experts = experts.to(torch.bfloat16).eval().requires_grad_(False)
    for e in range(spec.num_experts):
        mlp = experts[e]
        mlp.gate_up_proj = PackedLinear.from_linear(mlp.gate_up_proj, "ue8m0-fp8")
        mlp.down_proj = PackedLinear.from_linear(mlp.down_proj, "ue8m0-fp8")
    return experts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.moe.kernel_rate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from bench.moe.spec import MoeSpec  # noqa: PLC0415
    from cumulo.models.moe import softmax_topk  # noqa: PLC0415
    from cumulo.platform.kernels import gemv  # noqa: PLC0415

    torch.set_num_threads(1)
    spec = MoeSpec()
    E, H, inter, k = spec.num_experts, spec.hidden, spec.moe_intermediate, spec.top_k
    torch.manual_seed(0)
    layers = [fp8_experts(spec) for _ in range(4)]
    head = torch.randn(spec.vocab, H).to(torch.bfloat16)
    x = torch.randn(1, H).to(torch.bfloat16)
    big = torch.ones(2**28 // 4)

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        start = time.thread_time()
        fn()
        return time.thread_time() - start

    times: dict[str, list[float]] = {"grouped experts (fp8)": [], "dense bf16 lm_head": [], "sum": []}
    with torch.inference_mode():
        for i in range(args.calls):
            weights, ids = softmax_topk(
                torch.randn(1, E, generator=torch.Generator().manual_seed(i)), k, True
            )
            experts = layers[i % len(layers)]
            times["grouped experts (fp8)"].append(timed(lambda: experts(x, weights, ids)))  # noqa: B023
            times["dense bf16 lm_head"].append(timed(lambda: gemv.bf16_linear(x, head, None)))
            if i % 6 == 0:
                times["sum"].append(timed(big.sum))
    sizes = {"grouped experts (fp8)": k * 3 * H * inter, "dense bf16 lm_head": head.numel() * 2,
             "sum": big.numel() * 4}  # fmt: skip
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:<24} median {med * 1e3:7.3f} ms CPU  {sizes[name] / med / 1e9:5.1f} GB/s "
              f"(best {sizes[name] / min(t) / 1e9:5.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
