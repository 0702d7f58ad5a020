"""Loading GGUF files written like llama.cpp's converter: names, shapes, RoPE permutation, Gemma norms,
dequantization of quantized tensors, metadata config, and clear errors for files that are not models."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from cumulo.errors import InvalidModel, ModelNotFound, UnsupportedArchitecture
from cumulo.models.loader import load, load_config
from tests.support.checkpoints import hf_state_dict
from tests.support.gguf_files import write_gguf

QUANTIZED = {
    "mlp.": gguf.GGMLQuantizationType.Q4_0,
    "self_attn.": gguf.GGMLQuantizationType.Q8_0,
    "embed_tokens": gguf.GGMLQuantizationType.Q8_0,
}


def _gguf_from_hf(arch, make_hf_model, tokenizer, tmp_path, qtypes=None, tied=False):
    directory = make_hf_model(arch, tied=tied)
    config = json.loads((directory / "config.json").read_text())
    path = tmp_path / f"{arch}.gguf"
    expected = write_gguf(path, arch, hf_state_dict(directory), config, tokenizer, qtypes)
    return path, expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_gguf_round_trip_gives_back_hugging_face_tensors(arch, make_hf_model, tiny_gguf_tokenizer, tmp_path):
    path, expected = _gguf_from_hf(arch, make_hf_model, tiny_gguf_tokenizer, tmp_path)
    model = load(path)
    assert set(model.weights) == set(expected)
    for name, array in expected.items():
        assert model.weights[name].shape == array.shape, name
        assert torch.equal(model.weights[name], torch.from_numpy(array)), name
    assert model.format == "gguf:F32"


def test_quantized_tensors_dequantize_to_the_values_the_quantizer_kept(
    make_hf_model, tiny_gguf_tokenizer, tmp_path
):
    path, expected = _gguf_from_hf("llama", make_hf_model, tiny_gguf_tokenizer, tmp_path, qtypes=QUANTIZED)
    model = load(path)
    original = hf_state_dict(make_hf_model("llama"))
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    # Q8_0 keeps values close but not exact: the check is meaningful only if quantization changed something.
    assert not torch.equal(model.weights[q_proj], original[q_proj])
    for name, array in expected.items():
        assert torch.equal(model.weights[name], torch.from_numpy(array)), name
    assert model.format == "gguf:Q8_0"


def test_llama_q_and_k_rows_are_unpermuted_but_qwen_rows_are_left_alone(
    make_hf_model, tiny_gguf_tokenizer, tmp_path
):
    for arch in ("llama", "qwen2"):
        path, _ = _gguf_from_hf(arch, make_hf_model, tiny_gguf_tokenizer, tmp_path)
        original = hf_state_dict(make_hf_model(arch))["model.layers.0.self_attn.k_proj.weight"]
        assert torch.equal(load(path).weights["model.layers.0.self_attn.k_proj.weight"], original)


def test_gguf_metadata_fills_the_model_config(make_hf_model, tiny_gguf_tokenizer, tmp_path):
    path, _ = _gguf_from_hf("gemma3", make_hf_model, tiny_gguf_tokenizer, tmp_path)
    config = load_config(path)
    assert config.architecture == "gemma3"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.sliding_window == 16 and config.sliding_window_pattern == 6
    assert config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings is True
    assert config.vocab_size == len(tiny_gguf_tokenizer["tokens"])
    assert config.max_position_embeddings == 128


def test_gguf_without_output_tensor_is_tied_and_with_one_is_not(make_hf_model, tiny_gguf_tokenizer, tmp_path):
    path, _ = _gguf_from_hf("qwen2", make_hf_model, tiny_gguf_tokenizer, tmp_path, tied=True)
    tied = load(path)
    assert tied.config.tie_word_embeddings and "lm_head.weight" not in tied.weights
    path, _ = _gguf_from_hf("qwen2", make_hf_model, tiny_gguf_tokenizer, tmp_path)
    untied = load(path)
    assert not untied.config.tie_word_embeddings and "lm_head.weight" in untied.weights


def test_gguf_seal_is_the_sha256_of_the_file(make_hf_model, tiny_gguf_tokenizer, tmp_path):
    import hashlib

    path, _ = _gguf_from_hf("llama", make_hf_model, tiny_gguf_tokenizer, tmp_path)
    assert load(path).seal == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_gguf_is_invalid_model(make_hf_model, tiny_gguf_tokenizer, tmp_path):
    path, _ = _gguf_from_hf("llama", make_hf_model, tiny_gguf_tokenizer, tmp_path)
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 3, 20):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(InvalidModel) as info:
            load(broken)
        assert "\n" not in str(info.value)


def test_text_file_and_empty_directory_are_invalid_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text, not a model\n")
    with pytest.raises(InvalidModel, match="not a model"):
        load(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidModel):
        load(empty)


def test_gguf_of_an_unknown_architecture_is_unsupported(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitecture, match="mamba"):
        load(path)


def test_missing_path_and_unpulled_catalog_name_are_model_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("CUMULO_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        load(tmp_path / "nothing-here.gguf")
    with pytest.raises(ModelNotFound, match="cumulo pull gemma3-270m"):
        load("gemma3-270m")


def test_llama3_rope_freqs_tensor_becomes_llama3_rope_scaling(make_hf_model, tiny_gguf_tokenizer, tmp_path):
    directory = make_hf_model("llama")
    config = json.loads((directory / "config.json").read_text())
    state = dict(hf_state_dict(directory))
    path = tmp_path / "llama31.gguf"
    freqs = np.ones(8, dtype=np.float32)
    freqs[4:] = 8.0  # llama.cpp stores 1 for high frequencies and the factor for low ones
    write_gguf(path, "llama", state, config, tiny_gguf_tokenizer, extra_tensors={"rope_freqs.weight": freqs})
    model = load(path)
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.rope_scaling["factor"] == 8.0
    assert "rope_freqs.weight" not in model.weights and not any("rope" in name for name in model.weights)


def test_gguf_weights_come_in_the_requested_dtype(make_hf_model, tiny_gguf_tokenizer, tmp_path):
    path, expected = _gguf_from_hf("qwen3", make_hf_model, tiny_gguf_tokenizer, tmp_path)
    model = load(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in model.weights.values())
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.weights[name], torch.from_numpy(expected[name]).to(torch.bfloat16))
