"""Kernel micro-benchmark of the number-format layer: fused kernels against torch fp32 F.linear, codec error.

    python -m bench.formats.kernels [--shapes 4096x4096,1536x576] [--repeat 50] [--threads N] [--json]

For each shape [N, K] and format it times y = x @ W^T for one row of x (single-stream decode) with the fused CPU
kernel, with the reference path (dequantize then matmul), and with torch fp32 `F.linear` on the unquantized
weight (the anchor); it prints ratios against the anchor and the GB/s of weight bytes read, next to the machine's
read bandwidth measured in the same run (torch sum over a 512 MiB tensor). It also prints, per format, bits per
weight and the relative RMS error on N(0, 1) weights. Never gates CI; numbers go in docs/formats.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.chips.bandwidth import read_bandwidth_gb_s
from bench.common import best_interleaved
from cumulo.formats.kernels import find_kernel
from cumulo.formats.quantize import quantize
from cumulo.formats.schemes import SCHEMES

KERNEL_FORMATS = ["ue8m0-fp8", "fp8", "mxfp8", "mxfp4", "nvfp4", "hif8", "mxint8"]


ANCHOR = "fp32 F.linear (anchor)"


def bench_kernels(shapes: list[tuple[int, int]], repeat: int) -> list[dict]:
    """Per shape: the anchor, each fused kernel, and (fewer rounds) the reference dequantize-then-matmul."""
    rows = []
    for n, k in shapes:
        w, x = torch.randn(n, k), torch.randn(1, k)
        fns: dict[str, Callable[[], object]] = {ANCHOR: lambda w=w, x=x: F.linear(x, w)}
        refs: dict[str, Callable[[], object]] = {}
        nbytes = {ANCHOR: n * k * 4}
        for fmt in KERNEL_FORMATS:
            p = quantize(w, fmt)
            binder = find_kernel("cpu", fmt)
            kernel = binder(p) if binder is not None else None
            if kernel is None:
                continue
            fns[fmt] = lambda x=x, kernel=kernel: kernel(x)
            refs[fmt] = lambda p=p, x=x: F.linear(x, p.dequantize())
            nbytes[fmt] = p.nbytes
        best = best_interleaved(fns, repeat)
        ref = best_interleaved(refs, max(2, repeat // 20))
        for name, t in best.items():
            row = {"shape": f"{n}x{k}", "format": name, "ms": t * 1e3, "speedup": best[ANCHOR] / t,
                   "gbps": nbytes[name] / t / 1e9}  # fmt: skip
            if name in ref:
                row["reference_ms"] = ref[name] * 1e3
            rows.append(row)
    return rows


# One decoder layer of SmolLM2-135M: q, k, v, o, gate, up, down as [N, K].
SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def bench_model_sweep(layers: int, repeat: int) -> list[dict]:
    """One decode step's linears of a SmolLM2-135M-shaped stack (distinct weights, so nothing stays in cache)."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) for _ in range(layers) for n, k in SMOLLM2_LAYER]
    xs = {k: torch.randn(1, k, generator=g) for _, k in SMOLLM2_LAYER}

    def run_all(calls: list[tuple[Callable[[torch.Tensor], object], torch.Tensor]]) -> Callable[[], None]:
        def step() -> None:
            for fn, x in calls:
                fn(x)

        return step

    fns = {ANCHOR: run_all([(lambda x, w=w: F.linear(x, w), xs[w.shape[1]]) for w in weights])}
    nbytes = {ANCHOR: sum(w.numel() * 4 for w in weights)}
    for fmt in KERNEL_FORMATS:
        binder = find_kernel("cpu", fmt)
        packed = [quantize(w, fmt) for w in weights]
        bound = [binder(p) if binder is not None else None for p in packed]
        if any(kernel is None for kernel in bound):
            continue
        fns[fmt] = run_all([(kernel, xs[p.shape[1]]) for kernel, p in zip(bound, packed, strict=True)])
        nbytes[fmt] = sum(p.nbytes for p in packed)
    best = best_interleaved(fns, repeat)
    return [{"format": name, "ms": t * 1e3, "speedup": best[ANCHOR] / t, "gbps": nbytes[name] / t / 1e9}
            for name, t in best.items()]  # fmt: skip


def bench_accuracy() -> list[dict]:
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    out = []
    for name, scheme in SCHEMES.items():
        p = quantize(w, name)
        err = ((p.dequantize() - w).norm() / w.norm()).item()
        out.append(
            {
                "format": name,
                "bits_per_weight": p.nbytes * 8 / w.numel(),
                "scheme_bits": scheme.bits_per_weight(),
                "rel_rmse_pct": err * 100,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.formats.kernels", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--shapes", default="4096x4096,1536x576,576x1536", help="weight shapes NxK, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=50, help="timed rounds per shape; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--layers", type=int, default=30, help="layers in the SmolLM2-shaped sweep")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    result = {
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbps": read_bandwidth_gb_s(torch.get_num_threads(), size_bytes=512 << 20),
        "kernels": bench_kernels(shapes, args.repeat),
        "decode_sweep": bench_model_sweep(args.layers, max(5, args.repeat // 4)),
        "accuracy": bench_accuracy(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"threads {result['threads']}, measured read bandwidth {result['read_bandwidth_gbps']:.1f} GB/s")
    print(f"\n{'shape':>10} {'format':>24} {'ms':>8} {'x anchor':>9} {'GB/s':>6} {'ref ms':>8}")
    for r in result["kernels"]:
        ref = f"{r['reference_ms']:8.3f}" if "reference_ms" in r else ""
        print(f"{r['shape']:>10} {r['format']:>24} {r['ms']:8.3f} {r['speedup']:9.2f} {r['gbps']:6.1f} {ref}")
    print(f"\nSmolLM2-135M-shaped decode step ({args.layers} layers x 7 linears, M = 1)")
    for r in result["decode_sweep"]:
        print(f"{r['format']:>24} {r['ms']:8.3f} ms {r['speedup']:6.2f} x anchor {r['gbps']:6.1f} GB/s")
    print(f"\n{'format':>18} {'bits/weight':>11} {'rel RMSE %':>10}  (1024x1024 N(0,1) weights)")
    for r in result["accuracy"]:
        print(f"{r['format']:>18} {r['bits_per_weight']:11.3f} {r['rel_rmse_pct']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
