"""A tiny Llama of several layers on disk, for the pipeline-parallel tests (engine and cluster): every weight
from N(0, 0.5), so greedy choices have margins no summation order reaches."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.checkpoints import hf_model, save_word_tokenizer


def write_llama_dir(path: Path, layers: int = 4, vocab: int = 64, tied: bool = False) -> Path:
    torch.manual_seed(0)
    model = hf_model(
        "llama", vocab, num_hidden_layers=layers, max_position_embeddings=256, tie_word_embeddings=tied
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, vocab)
    return path
