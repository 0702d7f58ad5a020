"""Output tokens/s of one batch spread over 8 LoRA adapters against the same batch on the base alone, in one
engine and one run (rounds interleaved, best of each kept). Decode steps with adapters replay graphs with LoRA
ops (cumulo.engine.decode_graph); two more columns, same run: `adapters_eager_lora`, a second engine whose
adapter steps run eagerly as they did before those graphs (its LoRA graphs marked unrecordable), and
`base_eager`, the base with decode graphs off."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import log, prompt_token_ids
from cumulo.contracts import AdapterRef, SamplingParams
from cumulo.engine.decode_graph import MAX_BATCH
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.engine.lora import TARGETS

PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(base: Path, out: Path, count: int, rank: int) -> list[Path]:
    """`count` random PEFT adapters (all seven projections, rank `rank`) for `base`, written with PEFT's names."""
    import json  # noqa: PLC0415

    from safetensors.torch import save_file  # noqa: PLC0415

    cfg = json.loads((base / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # fmt: skip
    assert set(PARTS) <= TARGETS
    dirs = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for part in PARTS:
                where = "self_attn" if part in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{where}.{part}"
                n_in, n_out = shapes[part]
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
        d = out / f"adapter-{i}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PARTS)}
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs


def _run(
    engine: LLMEngine, adapters: list[AdapterRef | None], prompt_len: int, max_tokens: int, seed: int
) -> float:
    """Output tokens/s of len(adapters) requests, request i with adapters[i], all added at once."""
    for i, ref in enumerate(adapters):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, adapter=ref)
        engine.add_request(prompt_token_ids(prompt_len, seed * 1000 + i), params)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


def measure(base: Path, work: Path, batch: int, n_adapters: int, rank: int, prompt_len: int, max_tokens: int,
            rounds: int) -> dict:  # fmt: skip
    refs = [AdapterRef(f"a{i}", str(d)) for i, d in enumerate(write_adapters(base, work, n_adapters, rank))]
    options = dict(device="cpu", enable_prefix_caching=False, max_num_seqs=batch, kv_cache_gib=1.0)
    engine = create_engine(str(base), EngineConfig(**options))  # type: ignore[arg-type]
    eager = create_engine(str(base), EngineConfig(decode_graphs=False, **options))  # type: ignore[arg-type]
    eager_lora = create_engine(str(base), EngineConfig(**options))  # type: ignore[arg-type]
    eager_lora.runner._lora_graphs.update(dict.fromkeys(range(1, MAX_BATCH + 1)))  # None: tried, run eagerly
    spread = [refs[i % n_adapters] for i in range(batch)]
    t0 = time.perf_counter()
    for ref in refs:
        engine.adapters.get(ref)
    load_s = (time.perf_counter() - t0) / n_adapters
    _run(engine, [None] * batch, prompt_len, 4, 99)  # warm: graphs recorded, kernels built
    _run(engine, spread, prompt_len, 4, 98)
    _run(eager_lora, spread, prompt_len, 4, 98)
    best = {"base": 0.0, "adapters": 0.0, "adapters_eager_lora": 0.0, "base_eager": 0.0}
    per_round = []  # adapters / base within one round: what a shared machine's changing load disturbs least
    for r in range(rounds):
        now = {
            "base": _run(engine, [None] * batch, prompt_len, max_tokens, r),
            "adapters": _run(engine, spread, prompt_len, max_tokens, r),
            "adapters_eager_lora": _run(eager_lora, spread, prompt_len, max_tokens, r),
            "base_eager": _run(eager, [None] * batch, prompt_len, max_tokens, r),
        }
        best = {k: max(best[k], v) for k, v in now.items()}
        per_round.append((now["adapters"] / now["base"], now["adapters_eager_lora"] / now["base"]))
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in now.items()))
    return {
        "batch": batch, "adapters": n_adapters, "rank": rank, "prompt_len": prompt_len, "max_tokens": max_tokens,
        "tok_s": best, "ratio": best["adapters"] / best["base"],
        "ratio_eager_lora": best["adapters_eager_lora"] / best["base"],
        "ratio_per_round": [r[0] for r in per_round], "ratio_eager_lora_per_round": [r[1] for r in per_round],
        "ratio_median": sorted(r[0] for r in per_round)[len(per_round) // 2],
        "ratio_eager_lora_median": sorted(r[1] for r in per_round)[len(per_round) // 2],
        "ratio_vs_eager_base": best["adapters"] / best["base_eager"], "adapter_load_s": load_s,
    }  # fmt: skip
