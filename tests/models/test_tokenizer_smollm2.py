"""The real SmolLM2-135M-Instruct GGUF: tokenizer ids, chat prompt, special tokens, streaming and weights.

Expected ids were checked against transformers' own GGUF tokenizer (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`), and the dequantized weights against transformers' GGUF loader (equal to the last bit).
"""

from __future__ import annotations

import pytest
import torch

from cumulo.models.detokenize import IncrementalDetokenizer

pytestmark = pytest.mark.slow

EXPECTED_IDS = {
    "Hello world!": [19556, 905, 17],
    "The year 2024": [504, 713, 216, 34, 32, 34, 36],
    "don't you're I'll": [12420, 982, 346, 2316, 339, 3060],
    "  leading spaces\n\n\ttabs": [216, 2899, 5600, 1116, 197, 100, 7366],
    "<|im_start|>user\nhi<|im_end|>": [1, 4093, 198, 6004, 2],
    "안녕하세요 世界 🙂": [
        183,
        239,
        226,
        182,
        223,
        239,
        33085,
        242,
        183,
        222,
        133,
        183,
        244,
        238,
        216,
        7906,
        240,
        178,
        239,
        230,
        47526,
    ],
}


def test_smollm2_tokenizer_matches_the_reference_ids(smollm2):
    tokenizer = smollm2.tokenizer
    for text, ids in EXPECTED_IDS.items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_special_tokens_and_config(smollm2):
    tokenizer, config = smollm2.tokenizer, smollm2.config
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == {0, 2}
    assert tokenizer.vocab_size == config.vocab_size == 49152
    assert config.architecture == "llama" and config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (576, 30, 9)
    assert config.num_key_value_heads == 3 and config.head_dim == 64 and config.rope_theta == 100000.0
    assert smollm2.format == "gguf:Q4_1"
    assert smollm2.seal == "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_smollm2_chat_template_renders_chatml_with_its_default_system_prompt(smollm2):
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smollm2.tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2


def test_smollm2_streams_korean_and_chinese_without_broken_characters(smollm2):
    tokenizer = smollm2.tokenizer
    text = "한국어와 中文를 함께 씁니다 🙂 끝."
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_smollm2_weights_are_dequantized_with_hugging_face_names_and_shapes(smollm2):
    weights = smollm2.weights
    assert len(weights) == 272 and "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    # Q4_1 keeps 16 levels per block of 32: a row of a quantized matrix has few distinct values per block.
    block = weights["model.layers.0.mlp.up_proj.weight"][0, :32]
    assert len(torch.unique(block)) <= 16
