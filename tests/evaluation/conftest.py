"""Models for perplexity tests: a tiny random Llama (from tests/support/tiny.py), and toy modules whose
next-token probabilities are known exactly, so a perplexity can be checked against arithmetic rather than
against itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cumulo.models.attention import AttentionContext
from tests.support.tiny import tiny_config, tiny_model

TINY_VOCAB = 64


class CyclePredictor(nn.Module):
    """Puts a logit `margin` above the rest on (token + 1) % vocab: near-certain on the text 0, 1, 2, ...

    It records each call so tests can see what the evaluator fed it.
    """

    def __init__(self, vocab: int, margin: float = 60.0) -> None:
        super().__init__()
        self.vocab = vocab
        self.margin = margin
        self.calls: list[dict[str, object]] = []

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        self.calls.append(
            {
                "input_ids": input_ids.tolist(),
                "positions": positions.tolist(),
                "kv_cache": ctx.kv_cache,
                "inference_mode": torch.is_inference_mode_enabled(),
            }
        )
        return nn.functional.one_hot(input_ids, self.vocab).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.margin * torch.roll(hidden, shifts=1, dims=-1)


class UniformPredictor(CyclePredictor):
    """Every token equally likely: the perplexity is exactly the vocabulary size."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


@pytest.fixture(scope="session")
def tiny_llama() -> nn.Module:
    # weights wide enough that predictions depend on the history
    config = tiny_config("llama", vocab_size=TINY_VOCAB, max_position_embeddings=256, eos_token_ids=[])
    return tiny_model(config, weight_std=0.3)


@pytest.fixture(scope="session")
def tiny_text() -> list[int]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY_VOCAB, (70,), generator=generator).tolist()
