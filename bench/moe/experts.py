"""Times one sparse layer's `Experts.forward` alone on the benchmark model, at decode batch sizes: the
measurement behind changes to cumulo/models/moe.py (run it before and after a change, on the same machine).

    python -m bench.moe.experts --model bench/.anchors/models/<file>.gguf [--threads 2] [--format ue8m0-fp8]

Prints the best and median microseconds per call for 1, 8 and 16 tokens (best of N: the least disturbed call on
a shared machine), for the grouped kernel (one native call, cumulo.formats.kernels.moe) and the per-expert path,
interleaved call by call so both see the same load; their ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.moe.experts", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--format", default="ue8m0-fp8")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--tokens", default="1,8,16")
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from cumulo.engine.factory import build_for_use, resolve_dtype  # noqa: PLC0415
    from cumulo.models.moe import Experts, softmax_topk  # noqa: PLC0415
    from cumulo.platform import get_platform  # noqa: PLC0415

    platform = get_platform("cpu")
    dtype = resolve_dtype(args.dtype, platform)
    module, loaded = build_for_use(args.model, platform, dtype, args.format, args.threads)
    block = next(m for m in module.modules() if isinstance(m, Experts) or hasattr(m, "experts"))
    experts: Experts = block.experts
    k = loaded.config.num_experts_per_tok
    gen = torch.Generator().manual_seed(0)
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, loaded.config.hidden_size, generator=gen).to(dtype)
        logits = torch.randn(tokens, experts.num_experts, generator=gen)
        weights, ids = softmax_topk(logits, k, True)
        paths = {"grouped": experts.forward, "per-expert": experts.per_expert}
        times: dict[str, list[float]] = {name: [] for name in paths}
        with torch.inference_mode():
            for fn in paths.values():
                fn(x, weights, ids)
            for _ in range(args.calls):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    fn(x, weights, ids)
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        line = ", ".join(
            f"{name} best {min(t) * 1e6:7.0f} us median {med[name] * 1e6:7.0f} us"
            for name, t in times.items()
        )
        print(
            f"tokens {tokens:3d}: {line}; per-expert / grouped (median) {med['per-expert'] / med['grouped']:.2f}x"
            f" ({ids.unique().numel()} distinct experts, dtype {dtype}, threads {args.threads},"
            f" kernel {'on' if experts.grouped_kernel() is not None else 'OFF'})"
        )


if __name__ == "__main__":
    main()
