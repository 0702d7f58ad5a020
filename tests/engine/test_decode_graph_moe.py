"""Decode graphs of Qwen3-MoE: per-head q/k norms, the router's linear and the grouped expert kernel (routing
included) recorded as ops, so a decode step is one native replay. Replayed steps must give the eager engine's
tokens and log-probabilities (same dtype on both sides), with rows of one batch routed to different experts, and
the same recorded graph must serve later batches whose rows route elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.contracts import SamplingParams
from cumulo.engine.decode_graph import DecodeGraph
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.formats.kernels import moe as moe_kernel
from cumulo.models.qwen3_moe import Qwen3MoeSparseBlock
from cumulo.platform.kernels import graph
from tests.support.checkpoints import write_tiny_qwen3_moe

pytestmark = pytest.mark.skipif(
    not graph.available() or moe_kernel.library() is None,
    reason="no C++ compiler (or no AVX2) for the CPU kernels",
)

VOCAB = 160


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # layer 2 dense, layers 0, 1 and 3 routed: the graph holds both kinds of feed-forward
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("graph-moe"), VOCAB, mlp_only_layers=[2])


def _prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (count,))]


def _engine(path: Path, dtype: str, decode_graphs: bool) -> LLMEngine:
    config = EngineConfig(
        device="cpu", dtype=dtype, decode_graphs=decode_graphs, kv_cache_gib=0.01, block_size=4
    )
    return create_engine(str(path), config)


def _run(
    engine: LLMEngine, prompts: list[list[int]], tokens: int = 12
) -> dict[str, tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[str, tuple[list[int], list[float]]] = {i: ([], []) for i in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.new_logprobs)
    return out


def _same(want: dict, got: dict) -> None:
    for (tokens, logprobs), (got_tokens, got_logprobs) in zip(want.values(), got.values(), strict=True):
        assert got_tokens == tokens
        assert torch.allclose(torch.tensor(got_logprobs), torch.tensor(logprobs), atol=0.05)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 5])
def test_moe_graph_decode_matches_eager_and_is_reused(moe_dir: Path, dtype: str, batch: int) -> None:
    eager, replayed = _engine(moe_dir, dtype, False), _engine(moe_dir, dtype, True)
    sparse = [layer.mlp for layer in replayed.runner.model.model.layers]
    assert [isinstance(m, Qwen3MoeSparseBlock) for m in sparse] == [True, True, False, True]
    first, second = _prompts(batch, seed=1), _prompts(batch, seed=2)
    _same(_run(eager, first), _run(replayed, first))
    recorded = replayed.runner._graphs.get(batch)
    assert isinstance(recorded, DecodeGraph)  # the graph ran, MoE layers and all
    ids = recorded.buffers["expert_ids"]  # the last replayed step's routing (of the last routed layer)
    if batch > 1:
        assert len({tuple(sorted(row)) for row in ids.tolist()}) > 1  # rows routed to different experts
    # the same graph serves other sequences, routed elsewhere
    _same(_run(eager, second), _run(replayed, second))
    assert replayed.runner._graphs.get(batch) is recorded
    assert eager.runner._graphs == {}


def test_moe_graph_routing_equals_the_python_router(moe_dir: Path) -> None:
    """The recorded routing buffers hold what `softmax_topk` picks from the recorded router logits."""
    from cumulo.models.moe import softmax_topk

    engine = _engine(moe_dir, "float32", True)
    _run(engine, _prompts(3, seed=3), tokens=4)
    recorded = engine.runner._graphs[3]
    assert isinstance(recorded, DecodeGraph)
    b = recorded.buffers
    block = engine.runner.model.model.layers[3].mlp
    weights, ids = softmax_topk(b["logits"], block.top_k, block.norm_topk_prob)
    assert torch.equal(b["expert_ids"], ids)
    assert torch.allclose(b["expert_weights"], weights, rtol=1e-6, atol=1e-7)


def test_a_moe_layer_off_the_kernel_path_decodes_eagerly(moe_dir: Path) -> None:
    engine = _engine(moe_dir, "float32", True)
    for layer in engine.runner.model.model.layers:
        if isinstance(layer.mlp, Qwen3MoeSparseBlock):
            layer.mlp.experts.grouped = False  # the per-expert path: data-dependent shapes, no recorded form
    eager = _engine(moe_dir, "float32", False)
    prompts = _prompts(2, seed=4)
    _same(_run(eager, prompts), _run(engine, prompts))
    assert engine.runner._graphs == {2: None}
