"""Where a MoE decode step's time and calls go: cProfile over one-stream decode, with the grouped expert kernel
and with the per-expert path, in one process so both see the same machine load.

    python -m bench.moe.profile --model bench/.anchors/models/<file>.gguf [--threads 1] [--tokens 32]

Prints, per path, milliseconds per step and function calls per step (the counts do not depend on the load; the
times do), then the functions with the most own time per step.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.moe.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--format", default="ue8m0-fp8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)

    from cumulo.contracts import SamplingParams  # noqa: PLC0415
    from cumulo.engine.llm import LLM  # noqa: PLC0415
    from cumulo.models.moe import Experts  # noqa: PLC0415

    llm = LLM(args.model, device="cpu", format=args.format, threads=args.threads)
    experts = [m for m in llm.engine.runner.model.modules() if isinstance(m, Experts)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    for grouped in (True, False, True):
        for m in experts:
            m.grouped = grouped
        llm.engine.runner._graphs.clear()  # re-recorded (grouped) or refused (per-expert: eager steps)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        out = llm.generate([[5, 6, 7, 8]], params)[0]
        profiler.disable()
        wall = time.perf_counter() - start
        steps = len(out.token_ids)
        stats = pstats.Stats(profiler)
        calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
        graph = llm.engine.runner._graphs.get(1) is not None
        print(f"{'grouped kernel' if grouped else 'per-expert path'}{' (decode graph)' if graph else ''}: "
              f"{wall / steps * 1e3:.1f} ms/step "
              f"(under the profiler), {calls / steps:.0f} function calls/step, tokens {out.token_ids[:6]}")  # fmt: skip
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]  # type: ignore[attr-defined]
        for (file, line, name), (_, ncalls, tottime, *_rest) in rows:
            where = f"{file.rsplit('/', 1)[-1]}:{line}" if line else file
            print(f"    {ncalls / steps:7.1f}/step {tottime / steps * 1e3:7.2f} ms/step  {name} ({where})")


if __name__ == "__main__":
    main()
