"""Models for perplexity tests: a tiny random Llama, and toy modules whose next-token probabilities are known
exactly, so a perplexity can be checked against arithmetic rather than against itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cumulo.models.attention import AttentionContext
from cumulo.models.config import ModelConfig
from cumulo.models.registry import ARCHITECTURES

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
    config = ModelConfig(
        architecture="llama",
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = ARCHITECTURES["llama"](config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.dim() == 2:
                p.normal_(0.0, 0.3)  # large enough that predictions depend on the history
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_text() -> list[int]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY_VOCAB, (70,), generator=generator).tolist()
