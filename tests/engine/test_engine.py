"""End-to-end engine behaviour on tiny random models: paged attention equals a plain forward pass, batching
and chunking change nothing, the prefix cache and preemption keep outputs exact, and requests end cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.contracts import SamplingParams
from cumulo.engine.llm import LLM
from cumulo.errors import ContextLengthExceeded, InvalidRequest
from cumulo.models.attention import AttentionContext, KVCache

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


def run_all(engine, prompts, params):
    """Each prompt's whole answer, added up from the engine's deltas."""
    return LLM(engine).generate(prompts, params)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("fused", [False, True], ids=["torch-attention", "fused-kernel"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decode_with_paged_cache_matches_full_recompute(make_engine, arch, fused):
    engine = make_engine(arch, fused_attention=fused)
    prompt = prompts_of([21])[0]
    out = run_all(engine, [prompt], greedy(12))[0]
    # Reference: recompute the whole sequence without any cache at every step and take the argmax.
    model = engine.runner.model
    tokens = list(prompt)
    for _ in range(12):
        ids = torch.tensor(tokens)
        hidden = model(ids, torch.arange(len(tokens)), AttentionContext(kv_cache=None))
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
    assert out.token_ids == tokens[len(prompt) :]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_outputs_equal_one_at_a_time(make_engine, arch):
    prompts = prompts_of([5, 17, 33, 9, 40])
    alone = [run_all(make_engine(arch), [p], greedy(10))[0].token_ids for p in prompts]
    together = [o.token_ids for o in run_all(make_engine(arch), prompts, greedy(10))]
    assert together == alone


def test_chunked_prefill_gives_the_same_tokens_and_never_stalls_decodes(make_engine):
    prompts = prompts_of([7, 150])
    reference = [run_all(make_engine(), [p], greedy(8))[0].token_ids for p in prompts]
    engine = make_engine(max_num_batched_tokens=32)
    short = engine.add_request(prompts[0], greedy(8))
    engine.step()  # the short prompt is prefilled and now decoding
    long = engine.add_request(prompts[1], greedy(8))
    outputs = {short: [], long: []}
    steps_with_short_decoding = 0
    while engine.has_unfinished_requests():
        batch_tokens = {o.request_id for o in engine.step()}
        for rid in batch_tokens:
            outputs[rid].append(rid)
        if short in batch_tokens:
            steps_with_short_decoding += 1
    # The 150-token prompt needs 5 chunks of 32; the short request got a token in each of those steps.
    assert steps_with_short_decoding == 7  # 8 tokens, the first came from the prefill step
    again = make_engine(max_num_batched_tokens=32)
    assert [o.token_ids for o in run_all(again, prompts, greedy(8))] == reference


def test_prefix_cache_reuses_blocks_and_keeps_outputs_exact(make_engine):
    system = prompts_of([64], seed=3)[0]
    a, b = system + prompts_of([5], seed=4)[0], system + prompts_of([9], seed=5)[0]
    engine = make_engine()
    first = run_all(engine, [a], greedy(6))[0]
    second = run_all(engine, [b], greedy(6))[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64
    fresh = run_all(make_engine(enable_prefix_caching=False), [b], greedy(6))[0]
    assert second.token_ids == fresh.token_ids


@pytest.mark.parametrize("fused", [False, True], ids=["torch-attention", "fused-kernel"])
def test_preemption_under_kv_pressure_loses_and_corrupts_nothing(make_engine, fused):
    prompts = prompts_of([30, 30, 30, 30, 30, 30])
    reference = [run_all(make_engine(), [p], greedy(40))[0].token_ids for p in prompts]
    tight = make_engine(
        kv_tokens=16 * 16, fused_attention=fused
    )  # 16 blocks of 16: room for about three sequences at a time
    outs = run_all(tight, prompts, greedy(40))
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    assert tight.block_manager.num_free_blocks == 16


def test_abort_frees_blocks_and_reports_abort(make_engine):
    engine = make_engine()
    free = engine.block_manager.num_free_blocks
    rid = engine.add_request(prompts_of([40])[0], greedy(100))
    engine.step()
    engine.step()
    engine.abort(rid)
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [(rid, True, "abort")]
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == free


def test_same_seed_same_tokens_whatever_else_is_in_the_batch(make_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    prompt = prompts_of([12])[0]
    alone = run_all(make_engine(), [prompt], params)[0].token_ids
    others = prompts_of([5, 20, 8], seed=9)
    crowd = run_all(
        make_engine(),
        others[:2] + [prompt] + others[2:],
        [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
        + [params]
        + [SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)],
    )
    assert crowd[2].token_ids == alone


def test_max_tokens_and_eos_end_requests_with_the_right_reason(make_engine):
    engine = make_engine()
    out = run_all(engine, prompts_of([6]), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (5, "length")
    first = out.token_ids[0]
    stopped = run_all(
        engine, prompts_of([6]), SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[first])
    )[0]
    assert (stopped.token_ids, stopped.finish_reason) == ([first], "stop")


def test_stop_string_trims_text_and_ends_the_request(make_engine):
    engine = make_engine()
    full = run_all(engine, prompts_of([6]), greedy(12))[0]
    stop = full.text[4:6]
    cut = run_all(
        engine, prompts_of([6]), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_streamed_text_deltas_add_up_to_the_final_text(make_engine):
    engine = make_engine()
    outputs = []
    [final] = LLM(engine).generate(prompts_of([6]), greedy(15), on_output=outputs.append)
    assert all(o.request_id == final.request_id for o in outputs)
    assert "".join(o.new_text for o in outputs) == final.text and len(final.token_ids) == 15
    assert [t for o in outputs for t in o.new_token_ids] == final.token_ids
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]


def test_bad_requests_are_refused_with_clear_errors(make_engine):
    engine = make_engine()
    with pytest.raises(ContextLengthExceeded):
        engine.add_request([5] * 512, greedy(1))
    with pytest.raises(InvalidRequest):
        engine.add_request([], greedy(1))
    with pytest.raises(InvalidRequest):
        engine.add_request([5, 96], greedy(1))
    with pytest.raises(InvalidRequest):
        engine.add_request([5], SamplingParams(max_tokens=0))
    assert not engine.has_unfinished_requests()


def _rss_anon_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith("RssAnon:")), None)
    return int(line.split()[1]) * 1024 if line else None


def test_cpu_kv_cache_is_zero_and_resident_only_where_written():
    """A CPU cache of any size sits on fresh pages: all zeros, and costing memory only once written."""
    if _rss_anon_bytes() is None:
        pytest.skip("no /proc/self/status here")
    before = _rss_anon_bytes()
    cache = KVCache(4, 256, 16, 8, 64, torch.float32, "cpu")  # 64 MiB
    grew = _rss_anon_bytes() - before
    assert grew < 16 << 20, f"allocating the cache made {grew >> 20} MiB resident"
    assert all(bool((t == 0).all()) for t in cache.k + cache.v)
    cache.k[3][:, 7].fill_(1.5)
    assert float(cache.k[3].sum()) == 1.5 * 8 * 16 * 64 and float(cache.v[3].sum()) == 0.0
