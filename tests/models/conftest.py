"""Fixtures for model tests: tiny random checkpoints (Hugging Face directories and GGUF files, written the way
transformers and llama.cpp's converter write them) and the real SmolLM2-135M loaded once per session.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "안녕하세요, 세계! 한국어 문장을 토큰으로 나눕니다.",
    "你好，世界。中文句子也要分词。",
    "Emoji 🙂🚀 and numbers 12345 and symbols €≠∞.",
] * 20


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path):
    """The real SmolLM2 (`smollm2_path` comes from tests/conftest.py) loaded with float32 weights."""
    from cumulo.models.loader import load

    return load(smollm2_path)


# -- tiny tokenizer ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json trained on a few lines of English, Korean, Chinese and emoji."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "chat_template": CHATML})
    )
    return directory


def tokenizer_gguf_metadata(tokenizer_dir: Path) -> dict:
    """tokenizer.ggml.* values for the tiny tokenizer, as llama.cpp's converter writes a byte-level BPE."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if token in SPECIALS else 1 for token in tokens]
    return {
        "model": "gpt2",
        "pre": "gpt2",
        "tokens": tokens,
        "merges": merges,
        "types": types,
        "bos": tokens.index("<|im_start|>"),
        "eos": tokens.index("<|endoftext|>"),
    }


# -- tiny Hugging Face checkpoints ---------------------------------------------------------------------------
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _hf_model(arch: str, vocab_size: int, tied: bool):
    import transformers as tf

    if arch == "llama":
        config = tf.LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tied, rope_theta=10000.0, **SHAPE)
        return tf.LlamaForCausalLM(config)
    if arch == "qwen2":
        config = tf.Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=tied, **SHAPE)
        return tf.Qwen2ForCausalLM(config)
    if arch == "qwen3":
        config = tf.Qwen3Config(vocab_size=vocab_size, tie_word_embeddings=tied, head_dim=16, **SHAPE)
        return tf.Qwen3ForCausalLM(config)
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(
            vocab_size=vocab_size,
            tie_word_embeddings=True,
            head_dim=16,
            sliding_window=16,
            query_pre_attn_scalar=16,
            **SHAPE,
        )
        return tf.Gemma3ForCausalLM(config)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def make_hf_model(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_hf_model(arch, tied=False, dtype=torch.float32, shard=False) -> a saved Hugging Face directory."""
    vocab_size = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"].__len__()

    def make(
        arch: str, *, tied: bool = False, dtype: torch.dtype = torch.float32, shard: bool = False
    ) -> Path:
        torch.manual_seed(0)
        model = _hf_model(arch, vocab_size, tied)
        with torch.no_grad():
            for param in model.parameters():  # norms too, so that a lost "+1" or a swapped norm shows
                param.normal_(0.0, 0.5)
        model = model.to(dtype)
        directory = tmp_path_factory.mktemp(f"hf-{arch}")
        model.save_pretrained(directory, max_shard_size="40KB" if shard else "5GB")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
        return directory

    return make


def hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


# -- tiny GGUF files, written like llama.cpp's convert_hf_to_gguf.py -----------------------------------------
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
_GEMMA_LAYER = {
    **_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(hf_name: str, arch: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    table = _GEMMA_LAYER if arch == "gemma3" else _LAYER
    return f"blk.{layer}.{table[rest]}.{suffix}"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: per head, interleave the two rotary halves of the rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(
    path: Path,
    arch: str,
    state: dict[str, torch.Tensor],
    config: dict,
    tokenizer: dict,
    qtypes: dict[str, object] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write `state` (Hugging Face names) as a GGUF file; returns the float32 tensors a reader should get back
    (quantized ones after their quantization round trip), under Hugging Face names."""
    import gguf

    qtypes = qtypes or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtypes else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(tokenizer["model"])
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    if tokenizer.get("merges"):
        writer.add_token_merges(tokenizer["merges"])
    if tokenizer.get("scores"):
        writer.add_token_scores(tokenizer["scores"])
    writer.add_bos_token_id(tokenizer["bos"])
    writer.add_eos_token_id(tokenizer["eos"])
    writer.add_add_bos_token(tokenizer.get("add_bos", False))
    if tokenizer.get("chat_template"):
        writer.add_chat_template(tokenizer["chat_template"])
    expected: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        array = tensor.float().numpy().copy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0  # the converter folds Gemma's (1 + w) into the stored weight
        qtype = next((q for pattern, q in qtypes.items() if pattern in name), None)
        if qtype is not None and array.ndim == 2:
            stored = gguf.quants.quantize(array, qtype)
            array = gguf.quants.dequantize(stored, qtype).reshape(array.shape)
        else:
            qtype, stored = None, array
        expected[name] = array - 1.0 if arch == "gemma3" and name.endswith("norm.weight") else array
        if arch == "llama" and "q_proj" in name:
            stored = llama_cpp_permute(stored, config["num_attention_heads"])
        elif arch == "llama" and "k_proj" in name:
            stored = llama_cpp_permute(stored, config["num_key_value_heads"])
        writer.add_tensor(gguf_name(name, arch), stored, raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():  # GGUF-only tensors such as rope_freqs.weight
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


# Test modules are imported with --import-mode=importlib and cannot import this file; they get the helpers
# through fixtures instead.
@pytest.fixture(scope="session")
def gguf_writer() -> Callable[..., dict[str, np.ndarray]]:
    return write_gguf


@pytest.fixture(scope="session")
def hf_weights() -> Callable[[Path], dict[str, torch.Tensor]]:
    return hf_state_dict


@pytest.fixture(scope="session")
def tiny_gguf_tokenizer(tiny_tokenizer_dir: Path) -> dict:
    return tokenizer_gguf_metadata(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def chatml() -> str:
    return CHATML
