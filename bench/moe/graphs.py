"""One-stream MoE decode with recorded decode graphs against eager steps, interleaved in one process, and each as a
fraction of the bandwidth roof of the active bytes (measured in the same process, between rounds).

    python -m bench.moe.graphs --model bench/.anchors/models/<file>.gguf [--threads 1] [--rounds 4]

Each round decodes `--tokens` tokens at batch 1 with graphs, then eagerly, then measures the read bandwidth, so
all three see the same load; the best of the rounds is reported, and the per-round ratio graph / eager. The
model is bench.moe's (python -m bench.moe writes it once).
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import print_result, prompt_token_ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.moe.graphs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--format", default="ue8m0-fp8")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from bench.chips.bandwidth import read_bandwidth_gb_s  # noqa: PLC0415
    from bench.moe.spec import MoeSpec, active_bytes  # noqa: PLC0415
    from bench.moe.worker import tensor_bytes  # noqa: PLC0415
    from cumulo.contracts import SamplingParams  # noqa: PLC0415
    from cumulo.engine.llm import LLM  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu", format=args.format, threads=args.threads, kv_cache_gib=0.0625,
              max_model_len=256)  # fmt: skip
    runner = llm.engine.runner
    recorder = runner.graph_recorder
    spec = MoeSpec()
    parts = active_bytes(tensor_bytes(runner.model), num_experts=spec.num_experts, top_k=spec.top_k,
                         vocab=spec.vocab)  # fmt: skip

    def decode(graphs: bool, seed: int) -> float:
        runner.graph_recorder = recorder if graphs else None
        runner._graphs.clear()
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        llm.generate([prompt_token_ids(32, seed=seed + 1)], params)  # records the graph (or not) first
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        out = llm.generate([prompt_token_ids(32, seed=seed)], params)[0]
        assert (runner._graphs.get(1) is not None) == graphs, "graphs on but none recorded (or off and used)"
        return (args.tokens - 1) / (out.finished_time - out.first_token_time)

    rounds = []
    for r in range(args.rounds):
        graph_tok_s, eager_tok_s = decode(True, 100 * r), decode(False, 100 * r)
        bandwidth = read_bandwidth_gb_s(args.threads, repeats=3)
        roof = bandwidth * 1e9 / parts["total"]
        rounds.append({"graph_tok_s": graph_tok_s, "eager_tok_s": eager_tok_s, "bandwidth_gb_s": bandwidth,
                       "roof_tok_s": roof, "graph_of_roof": graph_tok_s / roof, "eager_of_roof": eager_tok_s / roof,
                       "graph_over_eager": graph_tok_s / eager_tok_s, "load": os.getloadavg()[0]})  # fmt: skip
        print(f"round {r}: graph {graph_tok_s:.1f} tok/s ({graph_tok_s / roof:.0%} of roof), eager "
              f"{eager_tok_s:.1f} ({eager_tok_s / roof:.0%}), graph/eager {graph_tok_s / eager_tok_s:.2f}, "
              f"bandwidth {bandwidth:.1f} GB/s, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    best = max(rounds, key=lambda x: x["graph_of_roof"])
    print(f"active MB/step {parts['total'] / 1e6:.1f} (lm_head {parts['lm_head'] / 1e6:.1f}); best round: graph "
          f"{best['graph_of_roof']:.0%} of roof, eager {best['eager_of_roof']:.0%}; graph/eager per round "
          + ", ".join(f"{x['graph_over_eager']:.2f}" for x in rounds))  # fmt: skip
    print_result({"active_bytes": parts, "rounds": rounds, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                     time.gmtime())})  # fmt: skip


if __name__ == "__main__":
    main()
