"""Decode graphs: a decode-only step replayed as one recorded list of kernel calls must compute what the eager
model computes (same tokens, same log-probabilities up to bf16 rounding), for dense and packed weights, at
every batch size, and fall back to the eager path for models it cannot record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.contracts import SamplingParams
from cumulo.engine.decode_graph import MAX_BATCH, DecodeGraph
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.formats.kernels import cpu as format_kernels
from cumulo.platform.cpu import CpuPlatform
from cumulo.platform.kernels import graph

pytestmark = pytest.mark.skipif(
    not graph.available(), reason="no C++ compiler (or no AVX2) for the CPU kernels"
)

PROMPTS = [[5, 9, 12, 40], [7, 7, 3], [100, 2, 31, 8, 19, 4, 66]] + [
    [3 + i, 50 + 7 * i, 200 - i] for i in range(9)
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, write_tiny_llama) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("graph-llama"), vocab=256, hidden=128, intermediate=256)


def _engine(path: Path, fmt: str | None, decode_graphs: bool, dtype: str = "bfloat16") -> LLMEngine:
    config = EngineConfig(
        device="cpu", dtype=dtype, format=fmt, decode_graphs=decode_graphs, kv_cache_gib=0.01
    )
    return create_engine(str(path), config)


def _run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
    out: dict[str, tuple[list[int], list[float]]] = {i: ([], []) for i in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.new_logprobs)
    return out


@pytest.mark.parametrize(
    "fmt,dtype",
    [(None, "bfloat16"), ("ue8m0-fp8", "bfloat16"), ("mxfp4", "bfloat16"), ("mxint8", "bfloat16"), ("mxint8-rceil", "bfloat16"),
     ("hif8", "bfloat16"), (None, "float32"), ("ue8m0-fp8", "float32")],
)  # fmt: skip
@pytest.mark.parametrize("batch", [1, 3, 8, 12])
def test_graph_decode_matches_eager_decode(tiny_dir: Path, fmt: str | None, dtype: str, batch: int) -> None:
    eager, replayed = _engine(tiny_dir, fmt, False, dtype), _engine(tiny_dir, fmt, True, dtype)
    want, got = _run(eager, PROMPTS[:batch]), _run(replayed, PROMPTS[:batch])
    # the graph really ran, at this batch size (and eager never recorded one); except where the batch has more
    # rows than the format's fused kernel takes, whose linears then dequantize for a GEMM and run eagerly
    fused = format_kernels.fused_max_rows(getattr(torch, dtype), fmt) if fmt == "mxfp4" else MAX_BATCH
    if batch <= fused:
        assert isinstance(replayed.runner._graphs.get(batch), DecodeGraph)
    else:
        assert batch in replayed.runner._graphs and replayed.runner._graphs[batch] is None
    assert eager.runner._graphs == {}
    for rid, (tokens, logprobs) in want.items():
        assert got[rid][0] == tokens
        assert torch.allclose(torch.tensor(got[rid][1]), torch.tensor(logprobs), atol=0.05)


def test_models_it_cannot_record_decode_eagerly(tmp_path: Path, make_engine) -> None:
    from cumulo.engine.factory import use_platform_kernels

    engine = make_engine("gemma3")  # four norms per layer and a GELU MLP: not a plain decoder layer
    model = engine.runner.model.to(torch.bfloat16)
    use_platform_kernels(model, CpuPlatform(), torch.bfloat16)
    assert DecodeGraph.record(model, engine.kv_cache, 1, graph.Graph) is None
    # a model cast whole to 16 bits has 16-bit rotary tables, which the rotary kernel does not read: such a
    # model decodes eagerly (a graph would feed the kernel bf16 tables as fp32), and as built it records
    whole, built = (_tiny_engine("llama", torch.bfloat16, graph.Graph, cast_whole=c) for c in (True, False))
    assert whole.runner.model.model.layers[0].self_attn.rotary.cos.dtype == torch.bfloat16
    assert DecodeGraph.record(whole.runner.model, whole.kv_cache, 1, graph.Graph) is None
    assert DecodeGraph.record(built.runner.model, built.kv_cache, 1, graph.Graph) is not None


def test_a_failing_kernel_stops_the_graph_with_its_error() -> None:
    g = graph.Graph()
    qkv = torch.zeros(1, (2 + 2 * 1) * 8, dtype=torch.bfloat16)
    cos = sin = torch.zeros(4, 4)
    cache = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    q = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    positions = torch.tensor([9])  # outside the 4-position rotary table
    g.rope_and_cache(qkv=qkv, positions=positions, cos=cos, sin=sin, k_cache=cache, v_cache=cache.clone(),
                     slots=torch.tensor([0]), q=q, heads=2, kv_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="position is outside the rotary table"):
        g.run()
    positions[0] = 1  # the status word was cleared: the graph runs again once its input is good
    g.run()


def _tiny_engine(arch: str, dtype: torch.dtype, recorder: type | None, cast_whole: bool = False) -> LLMEngine:
    """A tiny random model of `arch` served in `dtype`, built as the engine builds models (weights in dtype,
    rotary tables in fp32) or, with `cast_whole`, by `.to(dtype)` on the whole module (16-bit tables too)."""
    from cumulo.engine.factory import use_platform_kernels
    from cumulo.engine.kv_sizing import plan_kv_cache
    from tests.support.tiny import CharTokenizer, tiny_config, tiny_model

    cfg = tiny_config(arch)
    model = tiny_model(cfg)
    if cast_whole:
        model = model.to(dtype)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    use_platform_kernels(model, CpuPlatform(), dtype)
    config, cpu = EngineConfig(device="cpu", kv_cache_gib=0.01), CpuPlatform()
    return LLMEngine(
        model, CharTokenizer(), config, plan_kv_cache(cfg, dtype, config, cpu), device=torch.device("cpu"),
        paged_decode_attention=cpu.paged_decode_attention(dtype, cfg.head_dim), graph_recorder=recorder,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qwen3_per_head_qk_norms_are_recorded(dtype: torch.dtype) -> None:
    """Qwen3's per-head q/k RMSNorm is recorded as norm ops over the q/k projection, in place, before the rotary
    kernel (the eager path normalises the same rows with the same kernel): the graph matches eager decode."""
    from tests.support.tiny import VOCAB

    prompts = [[p % VOCAB for p in prompt] for prompt in PROMPTS[:3]]
    eager, replayed = _tiny_engine("qwen3", dtype, None), _tiny_engine("qwen3", dtype, graph.Graph)
    assert replayed.runner.model.model.layers[0].self_attn.q_norm is not None
    want, got = _run(eager, prompts), _run(replayed, prompts)
    assert isinstance(replayed.runner._graphs.get(3), DecodeGraph)
    for rid, (tokens, logprobs) in want.items():
        assert got[rid][0] == tokens
        assert torch.allclose(torch.tensor(got[rid][1]), torch.tensor(logprobs), atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qwen2_qkv_biases_are_recorded_with_their_linear(dtype: torch.dtype) -> None:
    """Qwen2's q/k/v bias rides in the dense kernel's recorded call: the graph runs and matches eager decode."""
    from tests.support.tiny import VOCAB

    prompts = [[p % VOCAB for p in prompt] for prompt in PROMPTS[:3]]
    eager, replayed = _tiny_engine("qwen2", dtype, None), _tiny_engine("qwen2", dtype, graph.Graph)
    assert replayed.runner.model.model.layers[0].self_attn.qkv_proj.bias is not None
    want, got = _run(eager, prompts), _run(replayed, prompts)
    assert isinstance(replayed.runner._graphs.get(3), DecodeGraph)
    for rid, (tokens, logprobs) in want.items():
        assert got[rid][0] == tokens
        assert torch.allclose(torch.tensor(got[rid][1]), torch.tensor(logprobs), atol=0.05)
