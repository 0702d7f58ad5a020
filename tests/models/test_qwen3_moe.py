"""Qwen3-MoE against transformers' own Qwen3MoeForCausalLM on the same tiny random checkpoint, fp32 on both sides:
the layers that route to experts, logits of a whole prompt, and greedy generation through Cumulo's engine (paged
cache in small blocks, a batch whose experts see rows of several sequences, chunked prefill, preemption), from
both layouts Hugging Face writes experts in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from cumulo.contracts import SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm import LLM
from cumulo.engine.llm_engine import EngineConfig
from cumulo.models.attention import AttentionContext
from cumulo.models.loader import load
from cumulo.models.qwen3_moe import Qwen3MoeSparseBlock
from cumulo.models.registry import build_model
from tests.support.checkpoints import write_tiny_qwen3_moe

VOCAB = 160
# layer 2 dense by list; every other layer dense by step (layers 1 and 3 route)
VARIANTS = {
    "mlp-only-layers": dict(mlp_only_layers=[2], norm_topk_prob=True),
    "sparse-step-2": dict(decoder_sparse_step=2, norm_topk_prob=False),
}
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # K and V, 4 layers, 2 kv heads of 16, fp32


@pytest.fixture(scope="module", params=list(VARIANTS))
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp(request.param), VOCAB, **VARIANTS[request.param])


@pytest.fixture(scope="module")
def reference(moe_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32).eval()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf: transformers.PreTrainedModel, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation and the log-probability it gave each chosen token."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def _engine(directory: Path, kv_tokens: int = 4096, **options: object):
    gib = kv_tokens * KV_BYTES_PER_TOKEN / 2**30
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_gib=gib, block_size=4, **options)  # type: ignore[arg-type]
    return create_engine(str(directory), config)


def test_routed_layers_are_those_transformers_routes(moe_dir: Path, reference) -> None:
    loaded = load(str(moe_dir))
    ours = build_model(loaded.config, loaded.weights)
    routed = [isinstance(layer.mlp, Qwen3MoeSparseBlock) for layer in ours.model.layers]
    theirs = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in reference.model.layers]
    assert routed == theirs and any(routed) and not all(routed)
    expert = ours.model.layers[routed.index(True)].mlp.experts[7]
    assert expert.gate_up_proj.weight.shape == (2 * 32, 64)  # gate and up fused per expert


def test_prompt_logits_match_transformers(moe_dir: Path, reference) -> None:
    loaded = load(str(moe_dir))
    ours = build_model(loaded.config, loaded.weights)
    ids = torch.tensor(_prompts([48])[0])
    with torch.no_grad():
        ref = reference(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), AttentionContext(kv_cache=None)))
    assert ref.std() > 1.0  # decisive logits, or the comparison below proves little
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_engine_batch_greedy_matches_transformers(moe_dir: Path, reference) -> None:
    """Four sequences at once, prompts of 6 to 11 blocks of 4, prefill cut into chunks that share steps with
    other sequences' decodes: the same tokens as transformers one at a time, log-probabilities close."""
    prompts = _prompts([23, 30, 37, 44])
    expected = [_hf_greedy(reference, p, 12) for p in prompts]
    engine = _engine(moe_dir, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = LLM(engine).generate(prompts, params)
    for out, (tokens, logprobs) in zip(outs, expected, strict=True):
        assert out.token_ids == tokens
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in out.logprobs]), torch.tensor(logprobs), rtol=1e-4, atol=1e-4
        )


def test_engine_greedy_through_preemption_matches_transformers(moe_dir: Path, reference) -> None:
    prompts = _prompts([20, 24, 28, 22, 26], seed=2)
    expected = [_hf_greedy(reference, p, 16)[0] for p in prompts]
    tight = _engine(moe_dir, kv_tokens=24 * 4)  # 24 blocks of 4: room for about two sequences at a time
    outs = LLM(tight).generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected


def test_stacked_expert_tensors_load_as_per_expert_ones(moe_dir: Path, reference, tmp_path: Path) -> None:
    """transformers keeps experts stacked in memory ([E, 2I, H] gate_up_proj, [E, H, I] down_proj); a
    checkpoint saved from that state dict loads to the same model as the published per-expert layout."""
    from safetensors.torch import save_file

    state = {n: t.contiguous() for n, t in reference.state_dict().items()}
    assert any(n.endswith("mlp.experts.gate_up_proj") and t.dim() == 3 for n, t in state.items())
    save_file(state, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(moe_dir / name, tmp_path / name)
    stacked, published = load(str(tmp_path)), load(str(moe_dir))
    assert stacked.weights.keys() == published.weights.keys()
    for name, tensor in published.weights.items():
        assert torch.equal(stacked.weights[name], tensor), name


def test_config_without_expert_shape_is_a_clear_error(moe_dir: Path, tmp_path: Path) -> None:
    from cumulo.errors import InvalidModel

    raw = json.loads((moe_dir / "config.json").read_text())
    del raw["moe_intermediate_size"]
    for name in ("model.safetensors", "tokenizer.json"):
        shutil.copyfile(moe_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InvalidModel, match="moe_intermediate_size"):
        load(str(tmp_path))


@pytest.fixture(scope="module")
def sparse_step_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("moe-packed"), VOCAB, **VARIANTS["sparse-step-2"])


def _full_recompute_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor(ids)
            hidden = model(x, torch.arange(len(ids)), AttentionContext(kv_cache=None))
            ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("fmt", ["mxfp8", "ue8m0-fp8", "nvfp4", "mxfp4"])
def test_converted_model_keeps_experts_packed_and_serves_its_dequantized_output(
    sparse_step_dir: Path, tmp_path: Path, fmt: str
) -> None:
    from cumulo.cli.main import main as cli
    from cumulo.formats.linear import PackedLinear
    from cumulo.formats.packed import PackedWeight

    out = tmp_path / fmt
    assert cli(["convert", str(sparse_step_dir), "--format", fmt, "-o", str(out)]) == 0
    loaded = load(str(out))
    dense_equivalent = {
        n: (t.dequantize(torch.float32) if isinstance(t, PackedWeight) else t.float())
        for n, t in loaded.weights.items()
    }
    served = build_model(loaded.config, loaded.weights)
    block = served.model.layers[1].mlp
    assert isinstance(block, Qwen3MoeSparseBlock)
    assert type(block.gate) is torch.nn.Linear  # the router stays unquantized
    for e in range(8):
        assert isinstance(block.experts[e].gate_up_proj, PackedLinear)  # gate/up joined, still packed
        assert isinstance(block.experts[e].down_proj, PackedLinear)
    reference = build_model(loaded.config, dense_equivalent)
    ids = torch.tensor(_prompts([40])[0])
    with torch.no_grad():
        got = served.compute_logits(served(ids, torch.arange(40), AttentionContext(kv_cache=None)))
        ref = reference.compute_logits(reference(ids, torch.arange(40), AttentionContext(kv_cache=None)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    prompts = _prompts([18, 27], seed=3)
    engine = _engine(out)
    outs = LLM(engine).generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [_full_recompute_greedy(reference, p, 8) for p in prompts]
