"""Fused CPU kernels the engine may use in place of its PyTorch paths (each says whether it can run here)."""

from cumulo.platform.kernels.paged_attention import available, paged_decode_attention

__all__ = ["available", "paged_decode_attention"]
