"""A linear layer with correlated inputs, for tests of error-compensating rounding (GPTQ, flips), and the output
error a packed weight leaves on it."""

from __future__ import annotations

import torch

from cumulo.formats.packed import PackedWeight


def correlated_layer(n: int, k: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [n, k] and inputs [tokens, k] whose features are strongly correlated, as a transformer's
    activations are; seeded, so the same sizes give the same layer."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 3 * mix)  # [T, K]
    w = torch.randn(n, k, generator=g) * 0.05  # [N, K]
    return w, x


def output_error(packed: PackedWeight, w: torch.Tensor, x: torch.Tensor) -> float:
    """||x Q^T - x W^T|| / ||x W^T||."""
    ref = x @ w.T
    return float((x @ packed.dequantize().T - ref).norm() / ref.norm())
