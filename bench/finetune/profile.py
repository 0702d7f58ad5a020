"""Where a decode step's time goes, base-only against spread over 8 adapters, in one engine and one run:

    python -m bench.finetune.profile [--batch 16] [--steps 32] [--rounds 3]

Per decode step (milliseconds, best round of each): the graph replay (`DecodeGraph.graph.run`: base ops, plus
the LoRA ops in an adapter step), `set_adapters` (refilling the LoRA address table) and the whole
`ModelRunner.execute` (adds inputs, embedding and logits). The replay ratio is the LoRA ops' share."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import log
from bench.finetune.model import smollm2_dir
from bench.finetune.serving import _run, write_adapters
from cumulo.contracts import AdapterRef
from cumulo.engine.decode_graph import DecodeGraph
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig


def _timed(owner: object, name: str, into: list[float]) -> None:
    fn = getattr(owner, name)

    def timed(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(time.perf_counter() - t0)
        return out

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.finetune.profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = smollm2_dir()
    with tempfile.TemporaryDirectory(prefix="bench-ft-prof-") as tmp:
        refs = [AdapterRef(f"a{i}", str(d)) for i, d in enumerate(write_adapters(base, Path(tmp), 8, 8))]
        options = dict(device="cpu", enable_prefix_caching=False, max_num_seqs=args.batch, kv_cache_gib=1.0)
        engine = create_engine(str(base), EngineConfig(**options))  # type: ignore[arg-type]
        spread = [refs[i % 8] for i in range(args.batch)]
        for adapters in ([None] * args.batch, spread):
            _run(engine, adapters, 32, 4, 90)  # records the graphs
        times: dict[str, list[float]] = defaultdict(list)
        best: dict[str, float] = {}
        for graphs, kind in ((engine.runner._graphs, "base"), (engine.runner._lora_graphs, "adapters")):
            graph = graphs[args.batch]
            assert isinstance(graph, DecodeGraph)
            _timed(graph.graph, "run", times[f"{kind}_replay"])
            if kind == "adapters":
                _timed(graph, "set_adapters", times["adapters_set_adapters"])
        for r in range(args.rounds):
            for kind, adapters in (("base", [None] * args.batch), ("adapters", spread)):
                execute: list[float] = []
                _timed(engine.runner, "execute", execute)
                for key in list(times):
                    times[key].clear()
                _run(engine, adapters, 32, args.steps + 1, r)
                del engine.runner.execute  # back to the method
                decode = sorted(execute)[: args.steps]  # the prefill step is the slowest; drop it
                now = {f"{kind}_execute": sum(decode) / len(decode)}
                now |= {k: sum(v) / len(v) for k, v in times.items() if k.startswith(kind) and v}
                for k, v in now.items():
                    best[k] = min(best.get(k, v), v)
            log(f"  round {r + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(best.items())))
    result = {k: round(v * 1e3, 2) for k, v in sorted(best.items())}
    result["replay_ratio"] = round(best["base_replay"] / best["adapters_replay"], 3)
    result["execute_ratio"] = round(best["base_execute"] / best["adapters_execute"], 3)
    result["load"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
