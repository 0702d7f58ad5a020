"""A model split into pipeline stages (engine/pipeline.py) answers exactly as the unsplit engine: greedy tokens
equal token for token over prompts crossing several KV blocks, with chunked prefill and preemption; layers go
where the speed weights say; each stage's cache holds its own layers only."""

from __future__ import annotations

import pytest
import torch

from cumulo.contracts import SamplingParams
from cumulo.engine.kv_sizing import plan_kv_cache
from cumulo.engine.llm import LLM
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.engine.pipeline import local_pipeline, split_layers
from cumulo.errors import InvalidRequest
from cumulo.platform.budget import GIB
from cumulo.platform.cpu import CpuPlatform
from tests.support.pipeline import write_llama_dir
from tests.support.tiny import CharTokenizer, make_tiny_engine, tiny_config, tiny_model

LAYERS = 6


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def split_engine(weights, kv_tokens=4096, arch="llama", **options) -> LLMEngine:
    """The same tiny model as `make_tiny_engine(model_overrides=...)`, its layers split over stages in this
    process; every stage's cache has the blocks the unsplit engine has."""
    cfg = tiny_config(arch, num_hidden_layers=LAYERS)
    model = tiny_model(cfg, seed=0)
    per_token = 2 * LAYERS * cfg.num_key_value_heads * cfg.head_dim * 4
    config = EngineConfig(device="cpu", kv_cache_gib=kv_tokens * per_token / GIB, **options)
    plan = plan_kv_cache(cfg, torch.float32, config, CpuPlatform())
    runner = local_pipeline(model, weights, plan.num_blocks, plan.block_size, plan.dtype, torch.device("cpu"))
    return LLMEngine(None, CharTokenizer(), config, plan, device=torch.device("cpu"), pipeline=runner)


def unsplit(**options) -> LLMEngine:
    return make_tiny_engine(model_overrides={"num_hidden_layers": LAYERS}, **options)


def tokens(engine, prompts, n=24):
    return [o.token_ids for o in LLM(engine).generate(prompts, greedy(n))]


@pytest.mark.parametrize("stages", [2, 3])
def test_split_engine_gives_the_unsplit_engines_greedy_tokens(stages):
    prompts = prompts_of([5, 37, 70])  # up to five 16-token blocks with the completion
    reference = tokens(unsplit(), prompts)
    assert tokens(split_engine([1.0] * stages), prompts) == reference


def test_split_engine_matches_under_chunked_prefill_and_preemption():
    prompts = prompts_of([30, 30, 30, 30, 30, 30])
    reference = tokens(unsplit(), prompts, 40)
    tight = split_engine([1.0, 1.0, 1.0], kv_tokens=16 * 16, max_num_batched_tokens=32)
    assert tokens(tight, prompts, 40) == reference
    assert tight.scheduler.num_preemptions > 0
    assert tight.block_manager.num_free_blocks == 16


def test_gemma3_split_keeps_its_embedding_scale():
    cfg_over = {"num_hidden_layers": LAYERS}
    prompts = prompts_of([20, 33])
    reference = tokens(make_tiny_engine("gemma3", model_overrides=cfg_over), prompts)
    assert tokens(split_engine([1.0, 1.0], arch="gemma3"), prompts) == reference


def test_layers_are_split_contiguously_in_proportion_to_stage_speed():
    assert split_layers(6, [1, 1]) == [range(0, 3), range(3, 6)]
    assert split_layers(6, [2, 1]) == [range(0, 4), range(4, 6)]
    assert split_layers(10, [1, 3, 1]) == [range(0, 2), range(2, 8), range(8, 10)]
    assert split_layers(3, [100, 1, 1]) == [range(0, 1), range(1, 2), range(2, 3)]  # every stage gets one
    runner = split_engine([1.0, 2.0]).runner
    assert runner.layer_split == [range(0, 2), range(2, 6)]
    caches = [w.kv_cache for w in runner.stages.workers]
    assert [sum(t.numel() > 0 for t in c.k) for c in caches] == [2, 4]  # each holds its own layers only
    assert caches[1].k[1].numel() == 0 and caches[1].k[2].numel() > 0


def test_bad_splits_and_adapters_are_refused_with_clear_errors():
    with pytest.raises(InvalidRequest, match="cannot split 6 layers into 7"):
        split_layers(6, [1.0] * 7)
    with pytest.raises(InvalidRequest, match="positive"):
        split_layers(6, [1.0, 0.0])
    from cumulo.contracts import AdapterRef

    engine = split_engine([1.0, 1.0])
    params = SamplingParams(max_tokens=2, adapter=AdapterRef(name="a", path="/nowhere"))
    with pytest.raises(InvalidRequest, match="pipeline stages"):
        engine.add_request([5, 6], params)


def test_create_engine_splits_a_checkpoint_and_each_stage_loads_only_its_tensors(tmp_path):
    from cumulo.engine.factory import create_engine

    path = str(write_llama_dir(tmp_path / "llama4"))
    options = dict(device="cpu", dtype="float32", kv_cache_gib=0.001, decode_graphs=False)
    whole = create_engine(path, EngineConfig(**options))
    split = create_engine(path, EngineConfig(pipeline_stages=2, stage_weights=(1.0, 3.0), **options))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (9, 40)]
    assert tokens(split, prompts, 20) == tokens(whole, prompts, 20)
    assert split.seal == whole.seal and split.max_model_len == whole.max_model_len
    first, last = split.runner.stages.workers
    assert (first.layers, last.layers) == (range(0, 1), range(1, 4))
    names = [
        {n.split(".")[2] if ".layers." in n else n for n, _ in w.model.named_parameters()}
        for w in (first, last)
    ]
    assert names[0] == {"0", "model.embed_tokens.weight"}
    assert names[1] == {"1", "2", "3", "model.norm.weight", "lm_head.weight"}


def test_a_stage_cache_sized_for_its_layers_or_given_in_blocks():
    cfg = tiny_config("llama", num_hidden_layers=LAYERS)
    budget = EngineConfig(device="cpu", kv_cache_gib=0.001)
    whole = plan_kv_cache(cfg, torch.float32, budget, CpuPlatform())
    half = plan_kv_cache(cfg, torch.float32, budget, CpuPlatform(), num_layers=LAYERS // 2)
    assert half.num_blocks in (
        2 * whole.num_blocks,
        2 * whole.num_blocks + 1,
    )  # the same bytes, half the layers
    exact = EngineConfig(device="cpu", kv_cache_blocks=37)
    assert plan_kv_cache(cfg, torch.float32, exact, CpuPlatform(), num_layers=2).num_blocks == 37


@pytest.mark.parametrize(("fmt", "head", "tied"), [("ue8m0-fp8", "body", True), ("mxfp4", "bf16", False)])
def test_a_compact_format_checkpoint_splits_and_answers_as_unsplit(tmp_path, fmt, head, tied):
    """A checkpoint `cumulo convert` wrote loads stage by stage with its linears still packed; a tied model whose
    shared matrix is stored only as the packed head (`--head body`) gets its embedding rebuilt on the first
    stage and its packed head on the last, as the unsplit loader does."""
    from cumulo.cli.main import main
    from cumulo.engine.factory import create_engine
    from cumulo.formats.linear import PackedLinear

    source = write_llama_dir(tmp_path / "source", tied=tied)
    out = tmp_path / fmt
    assert main(["convert", str(source), "-f", fmt, "-o", str(out), "--head", head]) == 0
    options = dict(device="cpu", dtype="float32", kv_cache_gib=0.001, decode_graphs=False)
    whole = create_engine(str(out), EngineConfig(**options))
    split = create_engine(str(out), EngineConfig(pipeline_stages=2, stage_weights=(1.0, 1.0), **options))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (7, 38)]
    assert tokens(split, prompts, 20) == tokens(whole, prompts, 20)
    assert split.seal == whole.seal
    first, last = split.runner.stages.workers
    model = whole.runner.model
    packed = lambda m: [n for n, x in m.named_modules() if isinstance(x, PackedLinear)]  # noqa: E731
    assert packed(first.model) and packed(last.model)  # each stage holds its own packed layers only
    assert sorted(packed(first.model) + packed(last.model)) == sorted(packed(model))
    assert torch.equal(first.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert isinstance(last.model.lm_head, PackedLinear) is (head == "body")
    assert not isinstance(first.model.lm_head, PackedLinear)  # the head runs on the last stage only
