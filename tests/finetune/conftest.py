"""Fixtures for fine-tuning tests: tiny random models of each family saved as Hugging Face directories with the
byte-level BPE tokenizer and its ChatML template (tests/support/checkpoints.py), written once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.support.checkpoints import hf_model, save_bpe_tokenizer

# gemma3: seven layers so that one is global and the others attend through a window shorter than the tests' ids
ARCH_OVERRIDES = {
    "llama": {},
    "qwen3": dict(rope_theta=10000.0),
    "gemma3": dict(num_hidden_layers=7, sliding_window=8),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bpe_tokenizer(tmp_path_factory.mktemp("ft-tokenizer"))


@pytest.fixture(scope="session")
def make_model(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_model(arch="llama", std=0.1) -> a saved directory; weights N(0, std), norms N(0, 0.3), seed 0."""
    cache: dict[tuple[str, float], Path] = {}

    def make(arch: str = "llama", std: float = 0.1) -> Path:
        if (arch, std) not in cache:
            directory = tmp_path_factory.mktemp(f"ft-{arch}")
            model = hf_model(
                arch, 320, intermediate_size=96, max_position_embeddings=256, **ARCH_OVERRIDES[arch]
            )
            torch.manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.normal_(0.0, 0.3 if "norm" in name else std)
            model.save_pretrained(directory, safe_serialization=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
            cache[(arch, std)] = directory
        return cache[(arch, std)]

    return make


@pytest.fixture(scope="session")
def learnable_model(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama a LoRA can teach: norms at 1 and wide embeddings and head (N(0, 1), N(0, 0.5)), so that
    sharp next-token distributions are reachable; the rest N(0, 0.1). Random weights are still a base that
    knows nothing, so whatever it answers right after training it learned from the data."""
    directory = tmp_path_factory.mktemp("ft-learnable")
    model = hf_model("llama", 320, intermediate_size=96, max_position_embeddings=256)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 if "embed" in name else 0.5 if "lm_head" in name else 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory
