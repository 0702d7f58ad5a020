"""Decode graphs and DeepSeek-V3 (multi-head latent attention + MoE, issue #13): an engine asked for decode graphs
replays recorded DeepSeek steps (cumulo.engine.decode_graph_mla) with the eager engine's tokens and
log-probabilities, whatever the batch, the dtype or the rows' lengths; `DecodeGraph.record` answers None (not an
exception) for what it cannot record, and the step runs eagerly; and the two MLA ops equal the eager forms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.contracts import AdapterRef, SamplingParams
from cumulo.engine.decode_graph import DecodeGraph
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.models.mla import MLAttention
from cumulo.platform.kernels import graph
from tests.support.checkpoints import random_lora_b, tiny_deepseek_v3, write_tiny_deepseek_v3

pytestmark = pytest.mark.skipif(
    not graph.available(), reason="no C++ compiler (or no AVX2) for the CPU kernels"
)

VOCAB = 96


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_deepseek_v3(tmp_path_factory.mktemp("graph-mla"), VOCAB)


def _prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # 3..9 tokens with block_size 4: rows of different lengths, crossing KV blocks while they decode
    return [torch.randint(2, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(3, 10, (count,))]


def _engine(path: Path, dtype: str, decode_graphs: bool) -> LLMEngine:
    config = EngineConfig(
        device="cpu", dtype=dtype, decode_graphs=decode_graphs, kv_cache_gib=0.01, block_size=4
    )
    return create_engine(str(path), config)


def _run(
    engine: LLMEngine,
    prompts: list[list[int]],
    tokens: int | list[int] = 8,
    adapters: list[AdapterRef | None] | None = None,
) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probs per prompt; `tokens`: how many, for all or per prompt; `adapters`: each
    prompt's LoRA adapter (None: the base model)."""
    counts = tokens if isinstance(tokens, list) else [tokens] * len(prompts)
    refs = adapters or [None] * len(prompts)
    ids = [
        engine.add_request(
            p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0, adapter=ref)
        )
        for p, n, ref in zip(prompts, counts, refs, strict=True)
    ]
    out: dict[str, tuple[list[int], list[float]]] = {i: ([], []) for i in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.new_logprobs)
    return [out[i] for i in ids]


def _counted(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the engine's graph replays, one entry (the batch) per replayed step."""
    replays: list[int] = []
    real = DecodeGraph.run

    def run(self: DecodeGraph, input_ids: list[int], *args: object) -> torch.Tensor:
        replays.append(len(input_ids))
        return real(self, input_ids, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DecodeGraph, "run", run)
    return replays


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 4])
def test_deepseek_decode_graphs_equal_eager(
    deepseek_dir: Path, dtype: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With decode graphs on, a DeepSeek-V3 engine replays recorded MLA + MoE steps and gives the eager engine's
    greedy tokens and log-probabilities; then a second round of requests replays the same recorded graph."""
    eager, graphed = _engine(deepseek_dir, dtype, False), _engine(deepseek_dir, dtype, True)
    layers = graphed.runner.model.model.layers
    assert all(isinstance(layer.self_attn, MLAttention) for layer in layers)
    replays = _counted(graphed, monkeypatch)
    for seed in (batch, batch + 10):
        prompts = _prompts(batch, seed=seed)
        want, got = _run(eager, prompts), _run(graphed, prompts)
        for (tokens, logprobs), (got_tokens, got_logprobs) in zip(want, got, strict=True):
            assert got_tokens == tokens
            # the same ops in the same order; fp32 sums may be grouped differently by the kernels
            assert got_logprobs == pytest.approx(logprobs, abs=1e-4 if dtype == "float32" else 2e-2)
        if seed == batch:
            recorded = graphed.runner._graphs[batch]
            assert recorded is not None
    assert graphed.runner._graphs[batch] is recorded  # recorded once, replayed by the second round too
    assert replays.count(batch) == 2 * 7  # every decode step of both rounds: 8 tokens, the first from prefill


def test_packed_deepseek_graphs_equal_eager_as_rows_finish(deepseek_dir: Path) -> None:
    """FP8 weights (ue8m0-fp8, DeepSeek's own layout): rows asking for different lengths finish one by one, so
    the step's batch shrinks and a graph per size is recorded; tokens and log-probs stay the eager engine's."""
    engines = [
        create_engine(str(deepseek_dir), EngineConfig(device="cpu", dtype="bfloat16", decode_graphs=graphs,
                                                      kv_cache_gib=0.01, block_size=4, format="ue8m0-fp8"))
        for graphs in (False, True)
    ]  # fmt: skip
    prompts = _prompts(4, seed=7)
    results = [_run(engine, prompts, tokens=[3, 5, 7, 9]) for engine in engines]
    for (tokens, logprobs), (got_tokens, got_logprobs) in zip(*results, strict=True):
        assert got_tokens == tokens
        assert got_logprobs == pytest.approx(logprobs, abs=2e-2)
    graphs = engines[1].runner._graphs
    assert [n for n, g in sorted(graphs.items()) if g is not None] == [1, 2, 3, 4]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepseek_variant_graphs_equal_eager(tmp_path: Path, dtype: str) -> None:
    """The other branches of the recorded layer: q_proj instead of q_a/q_b (q_lora_rank None, as V2-Lite), no
    group limit (n_group 1) and unnormalised expert weights."""
    path = write_tiny_deepseek_v3(
        tmp_path, VOCAB, q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False
    )
    eager, graphed = _engine(path, dtype, False), _engine(path, dtype, True)
    last = graphed.runner.model.model.layers[-1]
    assert (
        last.self_attn.q_lora_rank is None and last.mlp.gate.n_group == 1 and not last.mlp.gate.norm_topk_prob
    )
    prompts = _prompts(3, seed=2)
    want, got = _run(eager, prompts), _run(graphed, prompts)
    for (tokens, logprobs), (got_tokens, got_logprobs) in zip(want, got, strict=True):
        assert got_tokens == tokens
        assert got_logprobs == pytest.approx(logprobs, abs=1e-4 if dtype == "float32" else 2e-2)
    assert graphed.runner._graphs[3] is not None


def test_record_mla(deepseek_dir: Path) -> None:
    """Called directly, `record` records an MLA model over its latent-only cache up to 16 rows; it answers None
    (no exception) where the graph cannot be had: more rows, LoRA ops where no linear carries adapters, a bf16
    router whose weight is fp32."""
    runner = _engine(deepseek_dir, "float32", True).runner
    assert runner.kv_cache.k == [] and len(runner.kv_cache.latent) > 0
    for batch in (1, 16):
        assert DecodeGraph.record(runner.model, runner.kv_cache, batch, graph.Graph) is not None
    assert DecodeGraph.record(runner.model, runner.kv_cache, 17, graph.Graph) is None
    assert DecodeGraph.record(runner.model, runner.kv_cache, 1, graph.Graph, lora=True) is None
    bf16 = _engine(deepseek_dir, "bfloat16", True).runner
    assert DecodeGraph.record(bf16.model, bf16.kv_cache, 2, graph.Graph) is not None
    router = bf16.model.model.layers[-1].mlp.gate
    router.weight.data = (
        router.weight.data.float()
    )  # eager's logits are the same; the recorded gemv has no form
    assert DecodeGraph.record(bf16.model, bf16.kv_cache, 2, graph.Graph) is None


def test_deepseek_steps_with_adapters_replay_lora_graphs_with_peft_tokens(
    deepseek_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PEFT LoRA adapter on every layer's o_proj (transformers 5 turns PEFT's MLP targets into the fused
    experts' parameters, which Cumulo does not serve): graphed steps with LoRA ops give the eager engine's tokens
    and log-probs and PEFT's own greedy tokens, with a base row in the same batch, and the LoRA graph replays."""
    import peft

    model = peft.get_peft_model(
        tiny_deepseek_v3(VOCAB), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"])
    )
    random_lora_b(model, 3, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    ref = AdapterRef(name="a", path=str(tmp_path / "adapter"))
    prompts = _prompts(3, seed=21)

    adapters = [ref, None, ref]  # a base row between two adapter rows
    eager = _run(_engine(deepseek_dir, "float32", False), prompts, adapters=adapters)
    graphed_engine = _engine(deepseek_dir, "float32", True)
    replays = _counted(graphed_engine, monkeypatch)
    graphed = _run(graphed_engine, prompts, adapters=adapters)
    assert [g for g in graphed_engine.runner._lora_graphs.values() if isinstance(g, DecodeGraph)]
    assert len(replays) >= 6  # the decode steps after the prefills replayed a graph
    for (g_ids, g_lps), (e_ids, e_lps) in zip(graphed, eager, strict=True):
        assert g_ids == e_ids
        torch.testing.assert_close(torch.tensor(g_lps), torch.tensor(e_lps), rtol=0, atol=1e-4)
    for i in (0, 2):  # the adapter's rows answer as PEFT does
        ids = list(prompts[i])
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert graphed[i][0] == ids[len(prompts[i]) :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorded_mla_decode_equals_the_absorbed_eager_form(deepseek_dir: Path, dtype: torch.dtype) -> None:
    """The graph's MLA op over a paged latent cache gives `MLAttention._decode`'s output: rows of different
    lengths, crossing blocks, tables in scattered order."""
    from types import SimpleNamespace

    attn = _engine(deepseek_dir, "float32", False).runner.model.model.layers[1].self_attn
    assert isinstance(attn, MLAttention)
    g = torch.Generator().manual_seed(5)
    heads, nope, rope, rank, block_size = attn.num_heads, attn.nope, attn.rope, attn.rank, 4
    cache = torch.randn(12, block_size, rank + rope, generator=g).to(dtype)
    lens = torch.tensor([1, 5, 9, 4], dtype=torch.int64)
    tables = torch.tensor([[7, 0, 0], [3, 11, 0], [2, 9, 5], [10, 0, 0]], dtype=torch.int64)
    q = torch.randn(4, heads, nope + rope, generator=g).to(dtype)
    ctx = SimpleNamespace(decode_block_tables=tables, decode_context_lens=lens, masks={})
    want = attn._decode(q[..., :nope], q[..., nope:], cache, ctx)  # [4, heads, v]
    w_uk, w_uv = attn._absorb(dtype)
    out = torch.zeros(4, heads, attn.v_dim, dtype=dtype)
    rec = graph.Graph()
    rec.mla_decode(q=q, w_uk=w_uk, w_uv=w_uv, cache=cache, tables=tables, lens=lens, out=out, scale=attn.scale,
                   threads=2)  # fmt: skip
    rec.run()
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert torch.allclose(out.float(), want.float(), atol=tol, rtol=tol)
    lens[2] = 13  # past its three blocks: refused in one line, nothing read out of range
    with pytest.raises(ValueError, match="context length or position out of range"):
        rec.run()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recorded_mla_rope_and_cache_equal_the_eager_writes(deepseek_dir: Path, dtype: str) -> None:
    """The graph's MLA write op rotates q_pe as the model's (YaRN, interleaved) rotary does, and writes
    kv_a_layernorm(latent) and the rotated k_pe into each row's cache slot, as `MLAttention.forward` does."""
    attn = _engine(deepseek_dir, dtype, False).runner.model.model.layers[0].self_attn
    assert isinstance(attn, MLAttention) and attn.rotary.interleaved  # DeepSeek's checkpoint layout
    t = getattr(torch, dtype)
    g = torch.Generator().manual_seed(6)
    heads, nope, rope, rank = attn.num_heads, attn.nope, attn.rope, attn.rank
    positions = torch.tensor([0, 7, 130, 300], dtype=torch.int64)  # past YaRN's original 128 positions too
    slots = torch.tensor([5, 0, 22, 9], dtype=torch.int64)
    q = torch.randn(4, heads, nope + rope, generator=g).to(t)
    kv = torch.randn(4, rank + rope, generator=g).to(t)
    with torch.no_grad():
        want_q = torch.cat([q[..., :nope], attn.rotary(positions, q[..., nope:])], dim=-1)
        latent, k_pe = kv.split([rank, rope], dim=-1)
        want_rows = torch.cat(
            [attn.kv_a_layernorm(latent), attn.rotary(positions, k_pe[:, None, :])[:, 0]], -1
        )
    cache = torch.zeros(6, 4, rank + rope, dtype=t)
    got_q = q.clone()
    rec = graph.Graph()
    norm = attn.kv_a_layernorm
    rec.mla_rope_cache(q=got_q, kv=kv, weight=norm.weight.detach().to(t).contiguous(), eps=norm.eps,
                       positions=positions, cos=attn.rotary.cos.float(), sin=attn.rotary.sin.float(), cache=cache,
                       slots=slots, interleaved=True)  # fmt: skip
    rec.run()
    tol = 1e-5 if t == torch.float32 else 0.02
    assert torch.allclose(got_q.float(), want_q.float(), atol=tol, rtol=tol)
    assert torch.equal(got_q[..., :nope], q[..., :nope])  # the non-rotary part untouched
    rows = cache.view(-1, rank + rope)
    assert torch.allclose(rows[slots].float(), want_rows.float(), atol=tol, rtol=tol)
    others = torch.ones(rows.shape[0], dtype=torch.bool)
    others[slots] = False
    assert not rows[others].any()  # nothing written elsewhere
    slots[1] = rows.shape[0]
    with pytest.raises(ValueError, match="cache slot out of range"):
        rec.run()
