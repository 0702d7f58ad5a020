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


def _write_qwen3moe_gguf(path: Path, hf_dir: Path, quantize_experts: bool) -> dict[str, torch.Tensor]:
    """The tiny model as llama.cpp's converter writes a Qwen3-MoE: experts stacked into 3-D `ffn_*_exps`
    tensors, the router as `ffn_gate_inp`, expert metadata under `qwen3moe.*`. Returns the float32 weights a
    reader should get back (the experts after their Q8_0 round trip when `quantize_experts`), by HF name."""
    import gguf

    from tests.support.checkpoints import hf_state_dict
    from tests.support.gguf_files import gguf_name

    config = json.loads((hf_dir / "config.json").read_text())
    state = hf_state_dict(hf_dir)
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_weights_norm(config["norm_topk_prob"])
    writer.add_tokenizer_model("none")
    expected: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        if ".mlp.experts." in name:  # model.layers.N.mlp.experts.E.proj.weight
            layer, rest = name.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            experts.setdefault((layer, proj), {})[int(e)] = tensor
            continue
        if name.endswith(".mlp.gate.weight"):
            gname = f"blk.{name.split('.')[2]}.ffn_gate_inp.weight"
        else:
            gname = gguf_name(name, "qwen3")
        writer.add_tensor(gname, tensor.numpy())
        expected[name] = tensor
    ggml = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
    for (layer, proj), per_expert in experts.items():
        stacked = torch.stack([per_expert[e] for e in sorted(per_expert)]).numpy()  # [E, out, in]
        qtype = gguf.GGMLQuantizationType.Q8_0 if quantize_experts else None
        if qtype is not None:
            raw = gguf.quants.quantize(stacked, qtype)
            stacked_back = gguf.quants.dequantize(raw, qtype).reshape(stacked.shape)
        else:
            raw, stacked_back = stacked, stacked
        writer.add_tensor(f"blk.{layer.split('.')[-1]}.{ggml[proj]}.weight", raw, raw_dtype=qtype)
        for e in sorted(per_expert):
            expected[f"{layer}.mlp.experts.{e}.{proj}.weight"] = torch.from_numpy(stacked_back[e].copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("quantize_experts", [False, True], ids=["f32", "q8_0-experts"])
def test_gguf_expert_tensors_round_trip(
    sparse_step_dir: Path, tmp_path: Path, quantize_experts: bool
) -> None:
    from cumulo.models.gguf import read_gguf

    path = tmp_path / "tiny-qwen3moe.gguf"
    expected = _write_qwen3moe_gguf(path, sparse_step_dir, quantize_experts)
    contents = read_gguf(path)
    published = load(str(sparse_step_dir))
    assert contents.config.architecture == "qwen3_moe"
    for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        assert getattr(contents.config, field) == getattr(published.config, field), field
    assert contents.config.mlp_only_layers == [0, 2]  # no router in the dense layers (sparse step 2)
    assert contents.weights is not None and contents.weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(contents.weights[name], tensor.float()), name
    from_gguf = build_model(contents.config, contents.weights)
    from_expected = build_model(published.config, dict(expected))
    ids = torch.tensor(_prompts([30])[0])
    with torch.no_grad():
        got = from_gguf.compute_logits(from_gguf(ids, torch.arange(30), AttentionContext(kv_cache=None)))
        ref = from_expected.compute_logits(
            from_expected(ids, torch.arange(30), AttentionContext(kv_cache=None))
        )
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
