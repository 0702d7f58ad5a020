"""Where a recorded decode step's time goes, kernel by kernel: the decode graph's ops run one at a time (instead
of in one native call) with a clock around each, summed by the kernel's symbol.

    python -m bench.moe.graph_ops --model bench/.anchors/models/<file>.gguf [--threads 2] [--batch 1]

The ops and their arguments are the recorded ones, so the outputs are the graph's own; each op costs one ctypes
call more than in `cumulo_graph_run` (about 1 us), which the per-op times include. Prints the engine's step
time and the graph's share of it, then milliseconds and calls per step by kernel, largest first.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections import defaultdict


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]  # fmt: skip


def symbol(address: int) -> str:
    """The C symbol at `address` (dladdr), e.g. `cumulo_moe_experts`."""
    info = _DlInfo()
    if ctypes.CDLL(None).dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.sname:
        return info.sname.decode()
    return hex(address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.moe.graph_ops", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--format", default="ue8m0-fp8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from cumulo.contracts import SamplingParams  # noqa: PLC0415
    from cumulo.engine.llm import LLM  # noqa: PLC0415
    from cumulo.platform.kernels import graph as graph_module  # noqa: PLC0415

    kernel = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    replays = [0]
    names: dict[int, str] = {}

    def timed_run(self: graph_module.Graph) -> None:
        if getattr(self, "_timed", None) is None:
            arrays = [torch.tensor(a, dtype=torch.int64) for _, a in self._ops]
            self._timed = [(kernel(fn), a, names.setdefault(fn, symbol(fn))) for (fn, _), a in
                           zip(self._ops, arrays, strict=True)]  # fmt: skip
        for call, array, name in self._timed:
            start = time.perf_counter_ns()
            code = call(array.data_ptr())
            totals[name] += time.perf_counter_ns() - start
            counts[name] += 1
            if code:
                raise ValueError(f"{name} returned {code}")
        replays[0] += 1

    llm = LLM(args.model, device="cpu", format=args.format, threads=args.threads)
    prompts = [[5 + i, 6, 7, 8] for i in range(args.batch)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # records the graph
    graph_module.Graph.run = timed_run
    start = time.perf_counter()
    out = llm.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True))
    wall = time.perf_counter() - start
    steps = max(replays[0], 1)
    replay_ms = sum(totals.values()) / 1e6 / steps
    print(f"{steps} replays at batch {args.batch}, {args.threads} threads: engine step {wall * 1e3 / len(out[0].token_ids):.2f} ms, "
          f"of which the graph's ops {replay_ms:.2f} ms")  # fmt: skip
    for name, ns in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {ns / 1e6 / steps:7.3f} ms/step  {counts[name] / steps:5.1f} calls/step  {name}")


if __name__ == "__main__":
    main()
