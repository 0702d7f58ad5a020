"""The one-call CPU RMSNorm against torch's, and its use by `RMSNorm` (Gemma's offset included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cumulo.models.layers import RMSNorm
from cumulo.platform.kernels import rms_norm as rn

pytestmark = pytest.mark.skipif(not rn.available(), reason="no C++ compiler here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (3, 7, 64), (300, 257), (1, 5)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_matches_torch_in_fp32_math(dtype, shape, offset):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype)
    y = rn.rms_norm(x, w, 1e-6, offset)
    ref = F.rms_norm(x.double(), (shape[-1],), w.double() + offset, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    else:  # one rounding to bf16 of an fp32 result: at most one bf16 step (2^-7 relative) away
        assert bool(((y.double() - ref).abs() <= ref.abs() * 2.0**-7 + 1e-30).all())


def test_declines_what_it_does_not_take():
    w = torch.ones(8)
    assert rn.rms_norm(torch.randn(4, 16)[:, ::2], w, 1e-6) is None  # not contiguous
    assert rn.rms_norm(torch.randn(2, 8).bfloat16(), w, 1e-6) is None  # dtypes differ
    assert rn.rms_norm(torch.randn(2, 8).half(), w.half(), 1e-6) is None  # fp16: torch's
    assert rn.rms_norm(torch.randn(2, 9), w, 1e-6) is None  # weight does not fit


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_module_uses_the_kernel_and_falls_back(offset):
    norm = RMSNorm(32, 1e-6, offset=offset)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 32)
    plain = norm(x)
    norm.kernel = rn.rms_norm
    torch.testing.assert_close(norm(x), plain, rtol=1e-5, atol=1e-6)
    calls = []
    norm.kernel = lambda *a: calls.append(a) or None  # declines: torch answers
    torch.testing.assert_close(norm(x), plain)
    assert len(calls) == 1
