"""What a pipeline split costs and saves, in one process: output tokens/s of a model split into 2 and 3 stages
against the same model unsplit (the anchor, measured in the same run, interleaved), and the weight bytes each
stage holds against the whole model's.

The model is a random Llama written to a temporary directory (safetensors: the form a split loads). Stages run
one after another for a step, so a split is expected to be a little slower than the unsplit engine on one
machine (the extra cost is the per-stage step setup); it exists to hold a model no one node holds.

    python -m bench.pool.pipeline [--layers 8] [--hidden 512] [--requests 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import log
from bench.pool.common import print_table, write_report
from cumulo.contracts import SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm import LLM
from cumulo.engine.llm_engine import EngineConfig


def write_model(path: Path, layers: int, hidden: int, vocab: int = 8192) -> Path:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=1024,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


def timed(engine, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    LLM(engine).generate(prompts, params)
    return len(prompts) * tokens / (time.perf_counter() - start)


def held_bytes(engine) -> list[int]:
    runner = engine.runner
    modules = [w.model for w in runner.stages.workers] if hasattr(runner, "stages") else [runner.model]
    return [sum(p.numel() * p.element_size() for p in m.parameters()) for m in modules]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool.pipeline")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_model(Path(tmp) / "llama", args.layers, args.hidden))
        options = dict(device="cpu", dtype="float32", kv_cache_gib=0.25, decode_graphs=False)
        setups = {"unsplit": 1, "2 stages": 2, "3 stages": 3}
        engines = {
            name: create_engine(path, EngineConfig(pipeline_stages=n, **options))  # type: ignore[arg-type]
            for name, n in setups.items()
        }
        g = torch.Generator().manual_seed(1)
        prompts = [
            torch.randint(3, 8192, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)
        ]
        timed(engines["unsplit"], prompts[:1], 4)  # warm-up
        speeds: dict[str, list[float]] = {name: [] for name in setups}
        for r in range(args.repeats):  # interleaved, so a load change on the machine hits every setup alike
            for name, engine in engines.items():
                speeds[name].append(timed(engine, prompts, args.tokens))
            log(f"repeat {r + 1}: " + ", ".join(f"{n} {s[-1]:.1f} tok/s" for n, s in speeds.items()))
        whole = sum(held_bytes(engines["unsplit"]))
        rows = []
        for name in setups:
            ratios = [s / u for s, u in zip(speeds[name], speeds["unsplit"], strict=True)]
            held = held_bytes(engines[name])
            rows.append({
                "setup": name, "tok/s (median)": f"{statistics.median(speeds[name]):.1f}",
                "vs unsplit (median ratio)": f"{statistics.median(ratios):.3f}",
                "largest stage weights / whole": f"{max(held) / whole:.3f}",
            })  # fmt: skip
    print(
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (a shared machine: noisy figures)"
    )
    print_table(rows, list(rows[0]))
    write_report("pipeline", {"args": vars(args), "load": load, "rows": rows, "speeds": speeds})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
