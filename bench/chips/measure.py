"""Runs and times the engine for the perf-model check: one (batch, prompt, output) shape, best-of rounds over
several shapes in turn, and the short probes whose timings cumulo.chips.fit turns into the model's software terms.
"""

from __future__ import annotations

import itertools

from cumulo.chips.fit import DecodeProbe, PrefillProbe, fit_software
from cumulo.chips.predict import Assumptions

_run_ids = itertools.count(1)  # numbers the measure() calls


def measure(llm, batch: int, prompt_len: int, max_tokens: int, clock) -> tuple[float, float]:
    """(decode tok/s, TTFT s) for `batch` prompts of `prompt_len` tokens arriving together, timed by `clock`."""
    from cumulo.contracts import SamplingParams

    run = next(_run_ids)
    vocab = 1000
    # Prompts never repeat across runs (each run's tokens start from its own offset): the engine's prefix cache
    # would otherwise serve a repeated prompt's blocks and shorten its TTFT.
    prompts = [[(17 * i + 31 * j + 7919 * run) % vocab + 10 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    first: dict[str, float] = {}
    done: dict[str, float] = {}

    def on_output(out) -> None:
        now = clock()
        if out.new_token_ids and out.request_id not in first:
            first[out.request_id] = now
        if out.finished:
            done[out.request_id] = now

    start = clock()
    llm.generate(prompts, params, on_output=on_output)
    all_first = max(first.values())
    decode_time = max(done.values()) - all_first
    return batch * (max_tokens - 1) / max(decode_time, 1e-9), all_first - start


def load_engine(llm_class, fmt: str, threads: int | None):
    """The engine with SmolLM2 in `fmt` (fp32/bf16: plain weights of that dtype; else a compact format on the
    engine's default dtype). If the engine's own `format=` path fails, the module is quantized here instead."""
    plain = {"fp32": "float32", "bf16": "bfloat16"}
    opts: dict = {"device": "cpu", "threads": threads}
    if fmt in plain:
        opts["dtype"] = plain[fmt]
    try:
        return llm_class("smollm2-135m", format=None if fmt in plain else fmt, **opts)
    except Exception as exc:  # noqa: BLE001 - report and try the fallback below
        first_error = exc
    try:
        from cumulo.formats.linear import quantize_model

        llm = llm_class("smollm2-135m", **opts)
        quantize_model(llm.engine.runner.model, fmt)
    except Exception as exc:  # noqa: BLE001
        print(f"  {fmt:<8} skipped: engine refused ({first_error}; fallback: {exc})")
        return None
    print(f"  {fmt:<8} note: engine format= failed ({first_error}); quantized with cumulo.formats.linear")
    return llm


def engine_dtype(llm) -> str:
    """The dtype the engine computes in ("fp32" or "bf16"), read from its model's floating-point tensors."""
    import torch

    for t in llm.engine.runner.model.parameters():
        if t.is_floating_point():
            return "bf16" if t.dtype == torch.bfloat16 else "fp32"
    return "fp32"


PROBE_BATCHES = (1, 8)  # decode software cost: a + b * sequences, fitted from these two batch sizes
# Prefill software cost per prompt, c0 + c1 * tokens, fitted by least squares over these (batch, prompt length)
# probes: more points than unknowns, since a single prefill on a shared host is noisy (50-250 ms, +-20%).
PREFILL_PROBES = ((1, 32), (8, 32), (1, 128), (2, 96), (4, 48))
ROUNDS = 3  # every probe and cell is run once per round, the rounds taking them in turn; each keeps its best


def best_of_rounds(
    llm, shapes: list[tuple[int, int, int]], clock, rounds: int = ROUNDS
) -> dict[tuple[int, int, int], tuple[float, float]]:
    """{(batch, prompt length, max tokens): (best decode tok/s, best TTFT s)} over `rounds` rounds that run the
    shapes in turn: a host whose speed drifts over seconds is sampled across its phases for every shape, instead
    of one shape catching a slow phase in all of its runs."""
    best = {shape: (0.0, float("inf")) for shape in shapes}
    for _ in range(rounds):
        for shape in shapes:
            dec, ttft = measure(llm, *shape, clock)
            best[shape] = (max(best[shape][0], dec), min(best[shape][1], ttft))
    return best


def probe_software(llm, pred, budget: int, max_tokens: int, clock, graph_max_batch: int = 0) -> Assumptions:
    """The engine's software time beyond the hardware model, from short runs (best of ROUNDS each, interleaved):
    batches 1 and 8 with 32-token prompts for the decode step's a + b * sequences; the PREFILL_PROBES' TTFTs
    (those two among them) for the prefill's c0 + c1 * tokens per prompt, fitted by cumulo.chips.fit. Fitted on
    the probes only; the table's cells use other shapes (64-token prompts at 1, 4 and 16)."""
    p1 = PREFILL_PROBES[0][1]
    decoding = {(b, p1) for b in PROBE_BATCHES}  # these probes decode max_tokens; their TTFTs count too
    shapes = [(b, p1, max_tokens) for b in PROBE_BATCHES]
    shapes += [(b, n, 2) for b, n in PREFILL_PROBES if (b, n) not in decoding]
    runs = best_of_rounds(llm, shapes, clock)
    decode = [DecodeProbe(b, p1 + max_tokens // 2, runs[(b, p1, max_tokens)][0]) for b in PROBE_BATCHES]
    prefill = [PrefillProbe(b, n, ttft) for (b, n, _), (_, ttft) in runs.items()]
    return fit_software(decode, prefill, pred, budget, graph_max_batch)
