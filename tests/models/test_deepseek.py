"""DeepSeek-V3 against transformers' own DeepseekV3ForCausalLM on the same weights (fp32 both sides): multi-head
latent attention with the latent in the paged cache, the absorbed decode, the group-limited sigmoid router,
dense first layers, shared experts and YaRN, through Cumulo's loader and engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.contracts import SamplingParams
from cumulo.engine.kv_sizing import kv_elements_per_token
from cumulo.engine.llm import LLM
from cumulo.formats.quantize import quantize
from cumulo.models.attention import AttentionContext, KVCache, PrefillChunk
from cumulo.models.loader import load
from cumulo.models.registry import build_model
from tests.support.checkpoints import DEEPSEEK_V3_SHAPE, save_word_tokenizer, tiny_deepseek_v3

VOCAB = 96
VARIANTS = {
    "q_lora": {},
    "q_proj": dict(q_lora_rank=None, rope_interleave=False),  # q projected directly, rotate-half rotary
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, saved directory) of one variant."""
    hf = tiny_deepseek_v3(VOCAB, **VARIANTS[request.param])
    path = tmp_path_factory.mktemp(f"deepseek-{request.param}")
    hf.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, VOCAB)
    return hf, path


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(hf, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation, a whole forward pass per token (no cache), with each step's logprobs."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            row = hf(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            logprobs.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt) :], logprobs


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=5)


def _engine(path: Path, **options: object) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", block_size=4, **options)


def test_loaded_config_and_logits_match_transformers(pair) -> None:
    hf, path = pair
    loaded = load(str(path))
    cfg = loaded.config
    assert (cfg.architecture, cfg.kv_lora_rank, cfg.n_group, cfg.topk_group) == ("deepseek_v3", 32, 4, 2)
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "yarn"
    ours = build_model(cfg, loaded.weights)
    ids = torch.tensor(_prompts([40])[0])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), AttentionContext(kv_cache=None)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4)


def test_engine_greedy_batch_across_kv_blocks_matches_transformers(pair) -> None:
    """Three sequences at once, prompts of 3 to 10 blocks of 4 tokens prefilled in chunks of at most 16 tokens
    beside the others' decodes, then 12 decodes each (absorbed form)."""
    hf, path = pair
    prompts = _prompts([11, 26, 40])
    outs = _engine(path, max_num_batched_tokens=16).generate(prompts, _greedy(12))
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, ref_logprobs = _hf_greedy(hf, prompt, 12)
        assert out.token_ids == tokens
        for got, ref in zip(out.logprobs, ref_logprobs, strict=True):
            top = ref.topk(5)
            assert [t for t, _ in got.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([lp for _, lp in got.top]), top.values, atol=1e-3, rtol=0)


def test_kv_cache_holds_one_latent_and_rotary_key_per_token_and_layer(pair) -> None:
    _, path = pair
    engine = _engine(path).engine
    cache = engine.kv_cache
    s = DEEPSEEK_V3_SHAPE
    per_token = s["num_hidden_layers"] * (s["kv_lora_rank"] + s["qk_rope_head_dim"])
    assert not cache.k and not cache.v
    cached = sum(t.numel() for t in cache.latent)
    assert cached == per_token * cache.num_blocks * cache.block_size
    assert kv_elements_per_token(engine.model_config) == per_token


def test_preemption_under_a_tiny_cache_keeps_tokens_exact(pair) -> None:
    hf, path = pair
    prompts = _prompts([14, 14, 14, 14], seed=5)
    reference = [_hf_greedy(hf, p, 16)[0] for p in prompts]
    s = DEEPSEEK_V3_SHAPE
    block_bytes = 4 * s["num_hidden_layers"] * (s["kv_lora_rank"] + s["qk_rope_head_dim"]) * 4
    llm = _engine(path, kv_cache_gib=16 * block_bytes / 2**30, enable_prefix_caching=False)
    assert llm.engine.block_manager.num_free_blocks == 16  # room for about two of the four sequences
    outs = llm.generate(prompts, _greedy(16))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference


def test_absorbed_decode_equals_the_expanded_form(pair) -> None:
    """Decoding through the cached latents (W_UK folded into q, W_UV after the weighted sum) gives the output
    that expanding every cached latent into per-head keys and values gives."""
    _, path = pair
    loaded = load(str(path))
    model = build_model(loaded.config, loaded.weights)
    attn = model.model.layers[1].self_attn
    cfg = loaded.config
    n, block = 13, 4
    x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(n)
    with torch.no_grad():
        expanded = attn(x, positions, AttentionContext(kv_cache=None))[-1]
        cache = KVCache(cfg.num_hidden_layers, 8, block, 0, 0, torch.float32, "cpu", latent_dim=48)
        table = torch.tensor([5, 2, 7, 0])  # blocks out of order, as the block manager hands them out
        slots = table[torch.arange(n) // block] * block + torch.arange(n) % block
        prefill = AttentionContext(
            kv_cache=cache, slot_mapping=slots[: n - 1], prefills=[PrefillChunk(0, n - 1, n - 1, table)]
        )
        attn(x[: n - 1], positions[: n - 1], prefill)
        decode = AttentionContext(
            kv_cache=cache,
            slot_mapping=slots[n - 1 :],
            num_decode=1,
            decode_block_tables=table[None],
            decode_context_lens=torch.tensor([n]),
        )
        absorbed = attn(x[n - 1 :], positions[n - 1 :], decode)[0]
    torch.testing.assert_close(absorbed, expanded, rtol=1e-4, atol=1e-4)


def test_router_matches_transformers_group_limited_selection() -> None:
    """Sigmoid scores, the bias for selection only, the best 2 of 4 groups, normalised and scaled weights."""
    from cumulo.models.deepseek import DeepseekRouter
    from cumulo.models.hf import config_from_json

    hf = tiny_deepseek_v3(VOCAB)
    hf_gate = hf.model.layers[1].mlp.gate
    cfg = config_from_json(hf.config.to_dict(), Path("tiny"))
    ours = DeepseekRouter(cfg)
    with torch.no_grad():
        ours.weight.copy_(hf_gate.weight)
        ours.e_score_correction_bias.copy_(hf_gate.e_score_correction_bias)
        x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
        _, ref_w, ref_ids = hf_gate(x)
        weights, ids = ours(x)
    ref_ids, order = ref_ids.sort(dim=-1)
    ids, mine = ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.gather(1, mine), ref_w.gather(1, order))
    # the bias decides: without it some tokens would pick other experts
    plain = torch.sigmoid(x @ hf_gate.weight.t()).topk(2).indices.sort(dim=-1).values
    assert not torch.equal(plain, ids)


def _write_block_fp8(hf, path: Path, format: str) -> None:
    """`hf` in DeepSeek's published block-FP8 layout, written by hand: every linear of the decoder (attention,
    dense MLP, experts, shared experts) as float8_e4m3fn `weight` plus fp32 `weight_scale_inv` per 128 x 128
    tile; embeddings, norms, router and lm_head as they are; quantization_config as DeepSeek's config.json
    has it. The model's own weights become the dequantized values, so transformers runs what Cumulo loads."""
    import json

    from safetensors.torch import save_file

    from cumulo.formats.quantize import quantize

    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, weight: torch.Tensor) -> None:  # quantize one linear, write it, return nothing
        packed = quantize(weight, format)
        tensors[f"{name}.weight"] = packed.codes.view(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale_inv"] = packed.scales.float()
        weight.copy_(packed.dequantize(torch.float32))

    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(".experts.gate_up_proj"):  # transformers holds experts stacked: [E, 2I, H]
                for e, w in enumerate(param):
                    gate, up = w.chunk(2, dim=0)  # views: dequantized values land in the stacked tensor
                    put(f"{name.removesuffix('gate_up_proj')}{e}.gate_proj", gate)
                    put(f"{name.removesuffix('gate_up_proj')}{e}.up_proj", up)
            elif name.endswith(".experts.down_proj"):  # [E, H, I]
                for e, w in enumerate(param):
                    put(f"{name.removesuffix('down_proj')}{e}.down_proj", w)
            elif name.startswith("model.layers.") and name.endswith("proj.weight"):
                put(name.removesuffix(".weight"), param)
            else:
                tensors[name] = param.detach().clone()
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensors[name] = buf.clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    }
    (path / "config.json").write_text(json.dumps(config))
    save_word_tokenizer(path, VOCAB)


@pytest.mark.parametrize("format", ["ue8m0-fp8", "fp8-block"])
def test_block_fp8_checkpoint_loads_packed_and_matches_transformers_on_the_dequantized_weights(
    tmp_path: Path, format: str
) -> None:
    """scale_fmt ue8m0 is DeepSeek-V3.1's; scales that are not powers of two (V3's fp32 scales under that
    config) load as fp8-block, which dequantizes them exactly, instead of being rounded to powers of two."""
    from cumulo.formats.kernels import find_kernel
    from cumulo.formats.linear import PackedLinear

    hf = tiny_deepseek_v3(VOCAB)
    _write_block_fp8(hf, tmp_path, format)
    llm = _engine(tmp_path)
    model = llm.engine.runner.model
    linears = [m for n, m in model.named_modules() if n.endswith("_proj")]
    assert linears and all(isinstance(m, PackedLinear) and m.format == format for m in linears)
    assert all(find_kernel("cpu", format)(m.packed) is not None for m in linears)  # the fused FP8 kernel runs
    prompts = _prompts([9, 23])
    outs = llm.generate(prompts, _greedy(8))
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, ref_logprobs = _hf_greedy(hf, prompt, 8)
        assert out.token_ids == tokens
        for got, ref in zip(out.logprobs, ref_logprobs, strict=True):
            torch.testing.assert_close(torch.tensor(got.logprob), ref.max(), atol=1e-3, rtol=0)


def test_a_packed_tensor_the_model_lacks_is_dropped_not_a_crash(pair) -> None:
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer (model.layers.61.*, partly FP8) that the
    served model does not run: loading ignores it, packed or not, as it ignores any tensor the model lacks."""
    _, path = pair
    loaded = load(str(path))
    extra = f"model.layers.{loaded.config.num_hidden_layers}.mlp.down_proj.weight"
    weights = dict(loaded.weights)
    weights[extra] = quantize(torch.randn(64, 128), "ue8m0-fp8")
    with_extra = build_model(loaded.config, weights)
    plain = build_model(loaded.config, loaded.weights)
    ids = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        a = with_extra.compute_logits(with_extra(ids, torch.arange(5), AttentionContext(kv_cache=None)))
        b = plain.compute_logits(plain(ids, torch.arange(5), AttentionContext(kv_cache=None)))
    assert torch.equal(a, b)


def test_the_selection_bias_stays_fp32_in_a_bf16_model(pair) -> None:
    """The expert-selection bias is held in fp32 when the model computes in bf16, as DeepSeek's reference holds
    it, so 16-bit rounding never changes which experts are picked; the rest of the model is bf16."""
    _, path = pair
    loaded = load(str(path))
    model = build_model(loaded.config, loaded.weights, dtype=torch.bfloat16)
    router = model.model.layers[1].mlp.gate
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.weight.dtype == torch.bfloat16
