"""bench.moe's pure parts: the active-bytes arithmetic behind its bandwidth roof, and the GGUF it writes (that
Cumulo reads it back as the Qwen3-MoE or DeepSeek-V3 the spec describes, with the source's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.moe.gguf_model import gguf_tensor_bytes, write_deepseek2_gguf, write_moe_gguf
from bench.moe.spec import DeepSeekSpec, MoeSpec, active_bytes, distinct_experts

Q8_0 = 34 / 32  # bytes per weight: 32 int8 codes and one fp16 scale per block


def _hf_bytes(spec: MoeSpec, tied: bool) -> dict[str, int]:
    """One byte per weight under Hugging Face names, as a served module's tensors are listed."""
    h, L = spec.hidden, spec.layers
    out = {"model.embed_tokens.weight": spec.vocab * h, "model.norm.weight": h}
    if not tied:
        out["lm_head.weight"] = spec.vocab * h
    for n in range(L):
        p = f"model.layers.{n}"
        out[f"{p}.self_attn.qkv_proj.weight"] = (spec.heads + 2 * spec.kv_heads) * spec.head_dim * h
        out[f"{p}.self_attn.o_proj.weight"] = spec.heads * spec.head_dim * h
        out[f"{p}.self_attn.q_norm.weight"] = out[f"{p}.self_attn.k_norm.weight"] = spec.head_dim
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_attention_layernorm.weight"] = h
        out[f"{p}.mlp.gate.weight"] = spec.num_experts * h
        for e in range(spec.num_experts):
            out[f"{p}.mlp.experts.{e}.gate_up_proj.weight"] = 2 * spec.moe_intermediate * h
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = spec.moe_intermediate * h
    return out


def test_one_token_reads_its_top_k_experts_one_embedding_row_and_the_whole_tied_lm_head() -> None:
    spec = MoeSpec.quick()
    parts = active_bytes(
        _hf_bytes(spec, tied=True), num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab
    )
    assert parts["experts"] == pytest.approx(spec.params()["experts_active"])
    assert parts["embedding_rows"] == spec.hidden
    assert parts["lm_head"] == spec.vocab * spec.hidden
    assert parts["total"] == pytest.approx(spec.params()["active"])


def test_an_untied_lm_head_is_read_whole_and_the_embedding_only_by_rows() -> None:
    spec = MoeSpec.quick()
    tied = active_bytes(
        _hf_bytes(spec, tied=True), num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab
    )
    untied = active_bytes(
        _hf_bytes(spec, tied=False), num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab
    )
    assert untied["total"] == pytest.approx(tied["total"])  # one matrix read per step either way


def test_a_batch_reads_each_distinct_expert_once_and_shared_weights_once() -> None:
    spec = MoeSpec.quick()
    one = active_bytes(
        _hf_bytes(spec, True), num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab
    )
    many = active_bytes(_hf_bytes(spec, True), num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab,
                        tokens=16)  # fmt: skip
    all_experts = spec.layers * spec.num_experts * 3 * spec.hidden * spec.moe_intermediate
    assert one["experts"] < many["experts"] < all_experts
    assert many["experts"] == pytest.approx(
        all_experts * distinct_experts(spec.num_experts, spec.top_k, 16) / spec.num_experts
    )
    assert many["attention+norms+router"] == one["attention+norms+router"]
    assert many["embedding_rows"] == 16 * one["embedding_rows"]


def test_distinct_experts_is_k_for_one_token_and_approaches_all_of_them() -> None:
    assert distinct_experts(64, 8, 1) == pytest.approx(8)
    assert 8 < distinct_experts(64, 8, 4) < 32
    assert distinct_experts(64, 8, 1000) == pytest.approx(64)


def test_active_bytes_without_an_embedding_is_an_error() -> None:
    with pytest.raises(ValueError, match="no embedding"):
        active_bytes({"blk.0.attn_q.weight": 10}, num_experts=4, top_k=2, vocab=10)


@pytest.fixture(scope="module")
def tokenizer_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A GGUF holding only a tokenizer (a small byte-level BPE), standing in for SmolLM2's."""
    import gguf

    from tests.support.checkpoints import save_bpe_tokenizer
    from tests.support.gguf_files import tokenizer_gguf_metadata

    directory = tmp_path_factory.mktemp("tok")
    meta = tokenizer_gguf_metadata(save_bpe_tokenizer(directory))
    path = directory / "tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    writer.add_bos_token_id(meta["bos"])
    writer.add_eos_token_id(meta["eos"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, meta["tokens"]


def test_written_gguf_reads_back_as_the_specified_qwen3_moe(tokenizer_gguf, tmp_path: Path) -> None:
    from cumulo.models.gguf import read_gguf

    source, tokens = tokenizer_gguf
    spec = MoeSpec(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, num_experts=4, top_k=2,
                   moe_intermediate=32, vocab=len(tokens), context=128)  # fmt: skip
    path = write_moe_gguf(spec, tmp_path / "moe.gguf", source)
    contents = read_gguf(path)
    c = contents.config
    assert (c.architecture, c.hidden_size, c.num_hidden_layers) == ("qwen3_moe", 64, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 32)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (4, 2, 32)
    assert c.norm_topk_prob and c.tie_word_embeddings
    assert contents.weights["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    import gguf

    fields = gguf.GGUFReader(str(path)).fields  # the source's tokenizer, copied whole (llama.cpp needs one)
    assert fields["tokenizer.ggml.tokens"].contents() == tokens
    assert (
        fields["tokenizer.ggml.merges"].contents()[:5]
        == gguf.GGUFReader(str(source)).fields["tokenizer.ggml.merges"].contents()[:5]
    )
    # the same seed writes the same weights: the cached file is reused only when it would be identical
    again = write_moe_gguf(spec, tmp_path / "again.gguf", source)
    assert again.read_bytes() == path.read_bytes()


def test_active_bytes_of_the_written_gguf_count_q8_0_experts_and_f32_router(
    tokenizer_gguf, tmp_path: Path
) -> None:
    source, tokens = tokenizer_gguf
    spec = MoeSpec(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, num_experts=4, top_k=2,
                   moe_intermediate=32, vocab=len(tokens), context=128)  # fmt: skip
    stored = gguf_tensor_bytes(write_moe_gguf(spec, tmp_path / "moe.gguf", source))
    parts = active_bytes(stored, num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab)
    h, L = spec.hidden, spec.layers
    assert parts["experts"] == pytest.approx(L * spec.top_k * 3 * h * spec.moe_intermediate * Q8_0)
    attn = (spec.heads + 2 * spec.kv_heads) * spec.head_dim * h + spec.heads * spec.head_dim * h
    f32 = 4 * (L * (spec.num_experts * h + 2 * h + 2 * spec.head_dim) + h)  # router and norms
    assert parts["attention+norms+router"] == pytest.approx(L * attn * Q8_0 + f32)
    assert parts["lm_head"] == pytest.approx(spec.vocab * h * Q8_0)  # tied: the Q8_0 embedding, whole


def test_written_deepseek2_reads_back_as_the_spec_and_its_params_count_the_file(
    tokenizer_gguf, tmp_path: Path
) -> None:
    import gguf

    from cumulo.models.gguf import read_gguf

    source, tokens = tokenizer_gguf
    spec = DeepSeekSpec(hidden=64, layers=3, first_dense=1, dense_intermediate=96, heads=2, q_lora_rank=32,
                        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, num_experts=8,
                        top_k=2, n_group=4, topk_group=2, moe_intermediate=32, vocab=len(tokens), context=128)  # fmt: skip
    path = write_deepseek2_gguf(spec, tmp_path / "ds.gguf", source)
    contents = read_gguf(path)
    c = contents.config
    assert (c.architecture, c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (
        "deepseek_v3",
        64,
        3,
        1,
    )
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        32,
        64,
        32,
        32,
        32,
    )
    assert (c.num_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.num_shared_experts) == (
        8,
        2,
        4,
        2,
        1,
    )
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob and c.tie_word_embeddings
    assert contents.weights["model.layers.1.self_attn.kv_b_proj.weight"].shape == (2 * (32 + 32), 64)
    assert contents.weights["model.layers.2.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    elements = {t.name: int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors}
    assert sum(elements.values()) == spec.params()["total"]
    one = active_bytes(elements, num_experts=spec.num_experts, top_k=spec.top_k, vocab=spec.vocab)
    assert one["total"] == spec.params()["active"]  # shared experts and the dense layer count as always read
    assert one["experts"] == spec.params()["experts_active"]


def test_parity_compare_reads_agreement_and_error_per_prompt() -> None:
    import numpy as np

    from bench.moe.parity import compare

    rng = np.random.default_rng(0)
    theirs = rng.standard_normal((2, 6, 10)).astype(np.float32)
    same = compare(theirs.copy(), theirs)
    assert all(r["relative_error"] == 0 and r["top1_agreement"] == 1 for r in same)
    assert all(r["correlation"] == pytest.approx(1.0) for r in same)
    shuffled = compare(theirs[:, :, ::-1].copy(), theirs)  # a layout mistake: the vocabulary reversed
    assert all(r["relative_error"] > 0.5 and r["correlation"] < 0.9 for r in shuffled)
