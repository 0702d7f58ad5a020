"""Loading Hugging Face-style directories: names, values, configs, formats and seals of tiny random models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cumulo.errors import InvalidModel, UnsupportedArchitecture
from cumulo.models.loader import load, load_config
from tests.support.checkpoints import hf_state_dict


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_hf_directory_loads_every_tensor_under_its_hugging_face_name(arch, make_hf_model):
    directory = make_hf_model(arch)
    model = load(directory)
    expected = hf_state_dict(directory)
    assert set(model.weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(model.weights[name], tensor.float()), name
    assert model.config.architecture == arch
    assert model.format == "safetensors:float32"


def test_hf_config_carries_shape_and_architecture_details(make_hf_model):
    qwen2 = load_config(make_hf_model("qwen2"))
    assert (qwen2.hidden_size, qwen2.num_attention_heads, qwen2.num_key_value_heads) == (64, 4, 2)
    assert qwen2.head_dim == 16 and qwen2.attention_bias is True
    gemma = load_config(make_hf_model("gemma3"))
    assert gemma.hidden_act == "gelu_pytorch_tanh"
    assert gemma.sliding_window == 16 and gemma.query_pre_attn_scalar == 16
    assert gemma.sliding_window_pattern == 6 and gemma.rope_local_base_freq == 10000.0
    assert gemma.tie_word_embeddings is True


def test_untied_llama_keeps_lm_head_and_tied_llama_has_none(make_hf_model):
    untied = load(make_hf_model("llama", tied=False))
    assert "lm_head.weight" in untied.weights and untied.config.tie_word_embeddings is False
    tied = load(make_hf_model("llama", tied=True))
    assert "lm_head.weight" not in tied.weights and tied.config.tie_word_embeddings is True


def test_sharded_checkpoint_loads_all_shards_through_its_index(make_hf_model):
    directory = make_hf_model("llama", shard=True)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 1
    model = load(directory)
    assert set(model.weights) == set(hf_state_dict(directory))


def test_bfloat16_checkpoint_reports_its_storage_format_and_loads_in_the_requested_dtype(make_hf_model):
    model = load(make_hf_model("qwen3", dtype=torch.bfloat16), dtype=torch.float32)
    assert model.format == "safetensors:bfloat16"
    assert all(t.dtype == torch.float32 for t in model.weights.values())


def test_hf_tokenizer_comes_with_chat_template_bos_and_end_of_turn_tokens(make_hf_model):
    tokenizer = load(make_hf_model("llama")).tokenizer
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.eos_token_ids
    assert tokenizer.token_to_id("<|endoftext|>") in tokenizer.eos_token_ids
    assert tokenizer.bos_token_id == tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith(
        "<|im_start|>assistant\n"
    )


def test_seal_is_stable_and_changes_when_a_config_byte_changes(make_hf_model, tmp_path):
    source = make_hf_model("llama")
    first, second = load(source).seal, load(source).seal
    assert first == second and first.startswith("sha256:") and len(first) == 7 + 64
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert load(copy).seal != first


def test_unknown_model_type_is_unsupported_architecture(make_hf_model, tmp_path):
    copy = tmp_path / "gpt2ish"
    shutil.copytree(make_hf_model("llama"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        load(copy)


def test_directory_without_weights_is_invalid_model(make_hf_model, tmp_path):
    copy = tmp_path / "noweights"
    shutil.copytree(make_hf_model("llama"), copy)
    for path in copy.glob("*.safetensors"):
        path.unlink()
    with pytest.raises(InvalidModel, match="safetensors"):
        load(copy)


def test_rope_settings_read_from_both_config_styles(tmp_path):
    from cumulo.models.hf import config_from_json

    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=10
    )
    nested = {  # transformers 5: per attention kind
        "model_type": "gemma3_text",
        **shape,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }
    config = config_from_json(nested, tmp_path)
    assert config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4
    assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    classic = {
        "model_type": "llama",
        **shape,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }
    config = config_from_json(classic, tmp_path)
    assert config.rope_theta == 5e5 and config.rope_scaling["rope_type"] == "llama3"
    plain = config_from_json(
        {"model_type": "qwen2", **shape, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
        tmp_path,
    )
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
