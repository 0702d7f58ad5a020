"""The native int8 GEMM of a 1x1 conv (cumulo.platform.kernels.int8_gemm) against Int8Pointwise's torch path:
the same codes and int32 sums exactly, the same outputs to fp32 rounding, on both of its paths (AVX512-VNNI
where this CPU has it, and portable C++), ragged K and N, both activation kinds (int8 per row; u8 [0, 255] at
6/255 for relu6 inputs), with the fused residual and ReLU6; and the vision blocks built on it answer as the torch
path does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cumulo.edge import pointwise
from cumulo.edge.pointwise import RELU6_STEP, Int8InvertedResidual, Int8Pointwise
from cumulo.edge.vision import MBConv
from cumulo.platform.kernels import int8_gemm as ig

SHAPES = [
    (1, 1280, 1000),
    (7, 5, 3),
    (13, 37, 29),
    (162, 40, 24),
    (100, 144, 17),
    (49, 1152, 320),
    (6, 4, 16),
]


def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Int8Pointwise without the native kernel (as where it cannot be built or VNNI is missing)."""
    monkeypatch.setattr(Int8Pointwise, "native", lambda self: None)


def test_the_kernel_builds_here() -> None:
    assert ig.available(), ig._kernel.reason


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("relu6_input", [True, False])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@torch.no_grad()
def test_sums_equal_and_outputs_match_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, m: int, k: int, n: int, relu6_input: bool, portable: bool
) -> None:
    gen = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    layer = Int8Pointwise(
        torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), "int8", "w", relu6_input
    )
    x = torch.randn(m, k, generator=gen) * 4 + (2 if relu6_input else 0)  # relu6 inputs beyond [0, 6] too
    args = (x, layer.packed(), layer.scale, layer.bias)
    sums = ig.int8_gemm(*args, relu6_input=relu6_input, accumulators=True, portable=portable)
    y = ig.int8_gemm(*args, relu6_input=relu6_input, portable=portable)
    q, _ = layer.quantize(x)  # the torch path's codes
    assert q.dtype == (torch.uint8 if relu6_input else torch.int8)
    assert sums is not None and sums.dtype == torch.int32
    assert torch.equal(sums, q.int() @ layer.codes.t().int())
    torch_path(monkeypatch)
    assert torch.equal(sums, layer.sums(x)[0])  # relu6: _int_mm on codes - 128, plus 128 x the code sums
    reference = layer.matmul(x)  # quantize, _int_mm, addcmul
    assert y is not None
    torch.testing.assert_close(y, reference, rtol=2e-6, atol=2e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("path", ["vnni", "portable", "torch"])
@torch.no_grad()
def test_relu6_inputs_use_256_levels_of_6_over_255(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Each relu6 input comes back within half a step (6/255) of relu6(x), every code 0..255 in use: read from
    the sums against an identity weight (each channel's code 127 on the diagonal), so the kernel's codes too."""
    k = 37
    layer = Int8Pointwise(torch.eye(k), None, "int8", "w", relu6_input=True)
    x = torch.linspace(-1.0, 7.0, 40 * k).view(40, k)  # below 0, all of [0, 6], beyond 6
    if path == "torch":
        torch_path(monkeypatch)
        sums, y = layer.sums(x)[0], layer.matmul(x)
    else:
        args = (x, layer.packed(), layer.scale, layer.bias)
        portable = path == "portable"
        sums = ig.int8_gemm(*args, relu6_input=True, accumulators=True, portable=portable)
        y = ig.int8_gemm(*args, relu6_input=True, portable=portable)
    assert sums is not None and y is not None
    assert torch.equal(sums % 127, torch.zeros_like(sums))
    codes = sums // 127  # [40, k]
    assert int(codes.min()) == 0 and int(codes.max()) == 255 and codes.unique().numel() == 256
    assert RELU6_STEP == pytest.approx(6 / 255)
    relu6 = x.double().clamp(0.0, 6.0)
    assert float((codes.double() * (6 / 255) - relu6).abs().max()) <= RELU6_STEP / 2 + 1e-6
    # the dequantized output: through the identity weight, relu6(x) to half a step (and fp32 rounding)
    assert float((y.double() - relu6).abs().max()) <= RELU6_STEP / 2 + 1e-5


@pytest.mark.parametrize("portable", [False, True])
@torch.no_grad()
def test_residual_and_relu6_output_in_the_epilogue(portable: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    m, k, n = 37, 23, 45
    layer = Int8Pointwise(torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), "int8", "w")
    x, r = torch.randn(m, k, generator=gen), torch.randn(m, 2 * n, generator=gen)[:, :n]  # a strided residual
    plain = ig.int8_gemm(x, layer.packed(), layer.scale, layer.bias, relu6_input=False, portable=portable)
    fused = ig.int8_gemm(x, layer.packed(), layer.scale, layer.bias, relu6_input=False, relu6_output=True,
                         residual=r, portable=portable)  # fmt: skip
    assert plain is not None and fused is not None
    torch.testing.assert_close(fused, (plain + r).clamp(0, 6), rtol=2e-6, atol=2e-6)


def test_declines_what_it_does_not_take() -> None:
    layer = Int8Pointwise(torch.randn(8, 12), None, "int8", "w")
    args = (layer.packed(), layer.scale, layer.bias)
    assert ig.int8_gemm(torch.randn(4, 12).double(), *args, relu6_input=False) is None  # not fp32
    assert ig.int8_gemm(torch.randn(4, 24)[:, ::2], *args, relu6_input=False) is None  # columns strided
    assert ig.int8_gemm(torch.randn(4, 11), *args, relu6_input=False) is None  # K does not fit
    assert ig.int8_gemm(torch.randn(4, 12), *args, relu6_input=False, residual=torch.randn(4, 7)) is None


@torch.no_grad()
def test_without_vnni_the_layer_keeps_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where only the portable C++ path would run (5-20x slower than oneDNN's), the layer does not bind it."""
    layer = Int8Pointwise(torch.randn(20, 9), torch.randn(20), "int8", "w")
    x = torch.randn(30, 9)
    native = layer(x)
    monkeypatch.setattr(ig, "uses_vnni", lambda: False)
    layer.rebind()
    assert layer.native() is None
    torch.testing.assert_close(layer(x), native, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_changed_codes_are_packed_again() -> None:
    layer = Int8Pointwise(torch.randn(20, 9), None, "int8", "w")
    x = torch.randn(5, 9)
    before = layer(x)
    layer.codes.neg_()  # another rounding of the weight (in place), as an offline rounding pass may write
    torch.testing.assert_close(layer(x), -before + 2 * layer.bias, rtol=1e-5, atol=1e-5)
    layer.codes = torch.zeros_like(layer.codes)  # or a new tensor
    torch.testing.assert_close(layer(x), layer.bias.expand(5, 20))


def _block(cin: int, cout: int, kernel: int, stride: int, expand: int, seed: int) -> MBConv:
    torch.manual_seed(seed)
    block = MBConv(cin, cout, kernel, stride, expand).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    return block


@pytest.mark.parametrize("size", [11, 12])  # odd and even maps: symmetric and bottom-right "SAME" padding
@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "expand"),
    [(24, 24, 3, 1, 6), (16, 24, 3, 2, 6), (24, 40, 5, 2, 6), (32, 16, 3, 1, 1)],
)
@torch.no_grad()
def test_fused_block_answers_as_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, size: int, cin: int, cout: int, kernel: int, stride: int, expand: int
) -> None:
    """The block with its ReLU6s, skip and (strided) padding in the kernel, against the same modules on the
    torch path and against the float block."""
    seed = cin + cout + kernel
    fused = pointwise.quantize_vision_net(
        nn.Sequential(_block(cin, cout, kernel, stride, expand, seed)), "int8"
    )
    assert isinstance(fused[0], Int8InvertedResidual)
    x = (torch.randn(2, cin, size, size) * 2).contiguous(memory_format=torch.channels_last)
    native = fused(x)
    torch_path(monkeypatch)
    reference = fused(x)  # quantize, _int_mm, addcmul, add, clamp, F.pad
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    float_block = _block(cin, cout, kernel, stride, expand, seed)(x)  # and still the block, to int8 precision
    assert float((native - float_block).norm() / float_block.norm()) < 0.05
