"""Fixtures for model tests: the tiny tokenizer and tiny Hugging Face checkpoints written once per session
(tests/support/checkpoints.py, whose GGUF counterparts are in tests/support/gguf_files.py), and the real
SmolLM2-135M loaded once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.support.checkpoints import save_bpe_tokenizer, write_hf_model
from tests.support.gguf_files import tokenizer_gguf_metadata


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path):
    """The real SmolLM2 (`smollm2_path` comes from tests/conftest.py) loaded with float32 weights."""
    from cumulo.models.loader import load

    return load(smollm2_path)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json trained on a few lines of English, Korean, Chinese and emoji."""
    return save_bpe_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_gguf_tokenizer(tiny_tokenizer_dir: Path) -> dict:
    """The tiny tokenizer's tokenizer.ggml.* values, as llama.cpp's converter writes them."""
    return tokenizer_gguf_metadata(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def make_hf_model(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_hf_model(arch, tied=False, dtype=torch.float32, shard=False) -> a saved Hugging Face directory."""

    def make(
        arch: str, *, tied: bool = False, dtype: torch.dtype = torch.float32, shard: bool = False
    ) -> Path:
        directory = tmp_path_factory.mktemp(f"hf-{arch}")
        return write_hf_model(directory, arch, tiny_tokenizer_dir, tied=tied, dtype=dtype, shard=shard)

    return make
