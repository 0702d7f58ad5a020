"""NVFP4 and MXFP6 with bf16 x: their bf16 kernels (fp4.cpp, fp6.cpp) against the table kernel they replaced
(lut.cpp, x widened to fp32) and the dense bf16 kernel (gemv.cpp, the anchor), kernel alone, interleaved.

    python -m bench.formats.bf16_paths [--shapes 2048x2048,1536x576] [--rows 1,4,8,16] [--rounds 30] [--threads 1]

Per shape and row count it times y = x W^T for: the dense bf16 kernel on the bf16 weight (anchor), MXFP4's bf16
kernel (the format these paths copy), and for each of nvfp4, mxfp6, mxfp6-e3m2 the new path and the old one
(the same bound layer with cpu.USE_AVX512 off, which sends bf16 x to the table kernel). All calls of one shape
and row count run in turn within each round (bench.common.best_interleaved), best of the rounds. Prints ms and
the ratios against the anchor and new against old, with `uptime`'s load: the machine is shared. Never gates CI;
figures go in docs/formats.md.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from bench.common import best_interleaved
from cumulo.formats.kernels import cpu, find_kernel
from cumulo.formats.quantize import quantize
from cumulo.platform.kernels.gemv import bf16_linear

FORMATS = ["nvfp4", "mxfp6", "mxfp6-e3m2"]
ANCHOR = "dense bf16"


def _old(kernel: Callable, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        cpu.USE_AVX512 = False
        try:
            return kernel(x)
        finally:
            cpu.USE_AVX512 = True

    return run


def bench(n: int, k: int, rows: int, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g).bfloat16()
    wb = w.bfloat16()
    fns: dict[str, Callable[[], object]] = {ANCHOR: lambda: bf16_linear(x, wb)}
    mx4 = find_kernel("cpu", "mxfp4")(quantize(w, "mxfp4"))
    fns["mxfp4 bf16"] = lambda: mx4(x)
    for fmt in FORMATS:
        kernel = find_kernel("cpu", fmt)(quantize(w, fmt))
        fns[f"{fmt} new"] = lambda kernel=kernel: kernel(x)
        fns[f"{fmt} old"] = _old(kernel, x)
    return best_interleaved(fns, rounds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x2048,1536x576")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu.set_kernel_threads(args.threads)
    print(f"load before: {os.getloadavg()}  threads: {args.threads}")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for rows in (int(r) for r in args.rows.split(",")):
            best = bench(n, k, rows, args.rounds)
            anchor = best[ANCHOR]
            line = [f"{n}x{k} rows={rows:2d}  {ANCHOR} {anchor * 1e3:.3f} ms"]
            for name, t in best.items():
                if name != ANCHOR:
                    line.append(f"{name} {t * 1e3:.3f} ms ({t / anchor:.2f}x)")
            for fmt in FORMATS:
                line.append(f"{fmt} new/old {best[f'{fmt} new'] / best[f'{fmt} old']:.3f}")
            print("  ".join(line), flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
