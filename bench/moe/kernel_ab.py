"""Two builds of the grouped expert kernel (cumulo/platform/kernels/moe.cpp) against each other on one decode row,
interleaved in one process, in thread CPU time; first checks they give the same output bit for bit.

    python -m bench.moe.kernel_ab A.cpp B.cpp [--calls 100]

Why: on a shared machine two separate runs of bench.moe.kernel_rate differ by 2x with the load; interleaving
the two variants call by call puts both under the same load. Each source is built beside a copy of the kernel
headers (it includes them by relative path). Shapes as bench.moe.kernel_rate: bench.moe's experts, ue8m0-fp8.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.moe.kernel_ab", description=__doc__.splitlines()[0]
    )
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from bench.moe.kernel_rate import fp8_experts  # noqa: PLC0415
    from bench.moe.spec import MoeSpec  # noqa: PLC0415
    from cumulo.formats.kernels import moe as km  # noqa: PLC0415
    from cumulo.models.moe import softmax_topk  # noqa: PLC0415
    from cumulo.platform.kernels.build import KernelLibrary  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="cumulo-moe-ab-"))
    for header in km.SOURCE_DIR.glob("*.h"):
        shutil.copy(header, work)
    libs = {}
    for tag, source in (("A", args.a), ("B", args.b)):
        shutil.copy(source, work / f"moe_{tag}.cpp")
        lib = KernelLibrary(
            work / f"moe_{tag}.cpp", f"moe {tag}", ["cumulo_moe_experts"], name=f"moe_ab_{tag}"
        )
        libs[tag] = lib.get()
        if libs[tag] is None:
            raise SystemExit(f"{source}: {lib.reason}")

    torch.set_num_threads(1)
    spec = MoeSpec()
    E, H, inter, k = spec.num_experts, spec.hidden, spec.moe_intermediate, spec.top_k
    torch.manual_seed(0)
    bound: dict[str, list] = {"A": [], "B": []}
    for _ in range(4):  # four layers in turn: the selected experts are not in the caches from the call before
        experts = fp8_experts(spec)
        mlps = [experts[e] for e in range(E)]
        gu = km._table([m.gate_up_proj for m in mlps])
        dn = km._table([m.down_proj for m in mlps])
        for tag in "AB":
            bound[tag].append(km.GroupedExperts(libs[tag], gu, dn, H, inter))

    times: dict[str, list[float]] = {"A": [], "B": []}
    with torch.inference_mode():
        for rows in (1, 2, 3, 8):
            x = torch.randn(rows, H).to(torch.bfloat16)
            weights, ids = softmax_topk(torch.randn(rows, E), k, True)
            same = torch.equal(bound["A"][0](x, weights, ids), bound["B"][0](x, weights, ids))
            print(f"{rows} rows: A and B {'equal bit for bit' if same else 'DIFFER'}")
        x = torch.randn(1, H).to(torch.bfloat16)
        for i in range(args.calls):
            weights, ids = softmax_topk(
                torch.randn(1, E, generator=torch.Generator().manual_seed(i)), k, True
            )
            for tag in "AB" if i % 2 else "BA":
                start = time.thread_time()
                bound[tag][i % 4](x, weights, ids)
                times[tag].append(time.thread_time() - start)
    size = k * 3 * H * inter
    for tag, source in (("A", args.a), ("B", args.b)):
        med = statistics.median(times[tag])
        print(f"{tag} {source}: median {med * 1e3:.3f} ms CPU  {size / med / 1e9:5.1f} GB/s "
              f"(best {size / min(times[tag]) / 1e9:5.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
