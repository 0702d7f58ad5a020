"""DeepSeek-V3 from a GGUF file as llama.cpp's converter writes one (`deepseek2`): MLA as one wide key/value head
with kv_b_proj split into attn_k_b / attn_v_b (or whole, as older files have it), stacked experts, the
selection bias, group-limited sigmoid routing and YaRN from the metadata. Checked against transformers' own
DeepseekV3ForCausalLM on the same weights (fp32 both sides)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from cumulo.contracts import SamplingParams
from cumulo.engine.llm import LLM
from cumulo.errors import UnsupportedArchitecture
from cumulo.models.attention import AttentionContext
from cumulo.models.gguf import merge_kv_b, split_kv_b
from cumulo.models.loader import load
from cumulo.models.registry import build_model
from tests.support.checkpoints import DEEPSEEK_V3_SHAPE, tiny_deepseek_v3
from tests.support.gguf_files import write_deepseek2_gguf

# llama.cpp's GGUF carries one YaRN magnitude (mscale_all_dim); DeepSeek's releases set mscale to the same value
ROPE = dict(DEEPSEEK_V3_SHAPE["rope_parameters"], mscale=0.707, mscale_all_dim=0.707)


@pytest.fixture(scope="module")
def hf(tiny_gguf_tokenizer: dict):
    return tiny_deepseek_v3(len(tiny_gguf_tokenizer["tokens"]), rope_parameters=ROPE)


def _shape(hf) -> dict:
    return dict(DEEPSEEK_V3_SHAPE, rope_parameters=ROPE, vocab_size=hf.config.vocab_size)


def _write(hf, tokenizer: dict, path: Path, **options: object) -> dict:
    state = {name: t.detach().clone() for name, t in hf.state_dict().items()}
    return write_deepseek2_gguf(path, state, _shape(hf), tokenizer, **options)


def _fused(state: dict[str, torch.Tensor], per_expert: dict) -> dict[str, torch.Tensor]:
    """`state` with its fused expert tensors rebuilt from per-expert arrays (what the GGUF reader gives back)."""
    out = dict(state)
    for name in state:
        if not name.endswith(".mlp.experts.down_proj"):
            continue
        prefix = name.removesuffix("down_proj")
        count = state[name].shape[0]

        def get(e: int, proj: str, prefix: str = prefix) -> torch.Tensor:
            return torch.from_numpy(per_expert[f"{prefix}{e}.{proj}.weight"])

        out[name] = torch.stack([get(e, "down_proj") for e in range(count)])
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(count)]
        )
    return out


def _prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("split", [True, False], ids=["k_b-v_b", "kv_b"])
def test_deepseek2_gguf_gives_back_the_weights_and_transformers_logits(
    hf, tiny_gguf_tokenizer, tmp_path, split
):
    path = tmp_path / "tiny.gguf"
    expected = _write(hf, tiny_gguf_tokenizer, path, split_kv_b=split)
    loaded = load(path)
    cfg = loaded.config
    assert cfg.architecture == "deepseek_v3"
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
        32, 48, 16, 16, 24,
    )  # fmt: skip
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_shared_experts, cfg.first_k_dense_replace) == (
        8, 2, 1, 1,
    )  # fmt: skip
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob) == (4, 2, 2.5, True)
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 4 and cfg.rope_interleave
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["mscale_all_dim"] == pytest.approx(
        0.707
    )
    assert loaded.weights.keys() == expected.keys()
    for name, array in expected.items():
        assert torch.equal(loaded.weights[name], torch.from_numpy(array)), name
    ours = build_model(cfg, loaded.weights)
    ids = torch.tensor(_prompt(40, cfg.vocab_size))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), AttentionContext(kv_cache=None)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4)


def test_engine_on_a_deepseek2_gguf_with_q8_0_experts_decodes_greedily_like_transformers(
    hf, tiny_gguf_tokenizer, tmp_path
):
    path = tmp_path / "tiny-q8.gguf"
    expected = _write(hf, tiny_gguf_tokenizer, path, expert_qtype=gguf.GGMLQuantizationType.Q8_0)
    down = "model.layers.1.mlp.experts.down_proj"  # transformers 5 fuses the experts: [E, H, I]
    assert not torch.equal(
        torch.from_numpy(expected["model.layers.1.mlp.experts.3.down_proj.weight"]), hf.state_dict()[down][3]
    )
    reference = tiny_deepseek_v3(hf.config.vocab_size, rope_parameters=ROPE)
    reference.load_state_dict(_fused(hf.state_dict(), expected))
    prompts = [_prompt(n, hf.config.vocab_size, seed=n) for n in (13, 22)]
    llm = LLM(str(path), device="cpu", dtype="float32", block_size=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt) :]


def test_deepseek_v2_softmax_gating_is_refused_by_name(hf, tiny_gguf_tokenizer, tmp_path):
    path = tmp_path / "v2.gguf"
    _write(hf, tiny_gguf_tokenizer, path, gating=1)
    with pytest.raises(UnsupportedArchitecture, match="softmax is DeepSeek-V2"):
        load(path)


def test_split_and_merge_of_kv_b_are_inverse_and_follow_the_converter_layout() -> None:
    heads, nope, v, rank = 3, 4, 5, 6
    kv_b = torch.randn(heads * (nope + v), rank)
    k_b, v_b = split_kv_b(kv_b, heads, nope)
    assert k_b.shape == (heads, rank, nope) and v_b.shape == (heads, v, rank)
    assert torch.equal(k_b[1, :, 2], kv_b[(nope + v) + 2])  # head 1's key row 2, transposed
    assert torch.equal(v_b[2, 0], kv_b[2 * (nope + v) + nope])
    assert torch.equal(merge_kv_b(k_b, v_b), kv_b)
