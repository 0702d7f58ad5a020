"""Fused CPU kernels against the reference path (dequantize, then matmul), and the fallback without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cumulo.formats import codec
from cumulo.formats.element import E4M3FN
from cumulo.formats.kernels import BoundKernel, cpu, find_kernel, register_kernel, registered
from cumulo.formats.packed import PackedWeight, concat_rows
from cumulo.formats.quantize import quantize


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # fp32 accumulation in a different order: error relative to the output's scale stays near 1e-6.
    assert (y - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


@pytest.fixture(params=[True, False], ids=["best", "avx2"])
def fp8_path(request, monkeypatch) -> bool:
    """Run a test on the FP8 kernel's best path for this CPU, then again on its AVX2 path."""
    monkeypatch.setattr(cpu, "USE_AVX512", request.param)
    return request.param


@pytest.mark.parametrize("fmt", cpu.FP8_FORMATS + cpu.MXFP4_FORMATS + cpu.LUT_FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 6, 20, 80])  # 80: past FUSED_MAX_ROWS, the prefill path
def test_fused_kernel_matches_reference_dequantize_then_matmul(fmt: str, rows: int, fp8_path: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    n, k = (200, 320) if fmt.startswith("mxfp4") else (200, 300)  # 300: tails in every K-blocking
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)
    x = torch.randn(rows, k, generator=g)
    p = quantize(w, fmt)
    binder = find_kernel("cpu", fmt)
    assert binder is not None
    kernel = binder(p)
    assert cpu.library() is not None and kernel is not None
    y = kernel(x)
    if y is None:  # the table kernel leaves prefill to the reference path
        assert fmt in cpu.LUT_FORMATS and rows > cpu.FUSED_MAX_ROWS
        return
    _close(y, F.linear(x, p.dequantize()))


@pytest.mark.parametrize(
    "fmt,k",
    [
        (f, k)
        for f in cpu.FP8_FORMATS + cpu.MXFP4_FORMATS + cpu.LUT_FORMATS
        for k in (320, 300, 576, 352)  # 352: a last 64-code chunk holding one 32-code MX block
        if k % 32 == 0 or "fp4" not in f
    ],
)
@pytest.mark.parametrize(
    "rows", [1, 2, 5, 7, 11, 16]
)  # 7, 11, 16: the 8-row MXFP4 kernel, in two passes  # 11, 16: two passes of the 8-row MXFP4 kernel
def test_bf16_activations_give_bf16_results_of_the_same_product(
    fmt: str, rows: int, k: int, fp8_path
) -> None:
    """bf16 x (the engine's default dtype here) runs without conversions in torch: the product of the bf16
    values with the exact weights, accumulated in fp32 and rounded once to bf16."""
    g = torch.Generator().manual_seed(rows * k)
    n = 98  # not a multiple of the single-row kernels' 4 weight rows per pass: the leftover rows run too
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)
    x = torch.randn(rows, k, generator=g).bfloat16()
    p = quantize(w, fmt)
    kernel = find_kernel("cpu", fmt)(p)
    y = kernel(x)
    assert y is not None and y.dtype == torch.bfloat16
    ref = F.linear(x.double(), p.dequantize().double())
    spacing = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().clamp(min=1e-30))[1] - 8)
    assert bool(((y.double() - ref).abs() <= spacing + 1e-5 * ref.abs().amax()).all())


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", "mxfp8", "mxfp4"])
@pytest.mark.parametrize("rows", [8, 13, 16])  # batches: weights decoded once into bf16 for the dense tile
@pytest.mark.parametrize("exponents", ["spread", "out-of-range"])
def test_bf16_batches_multiply_the_bf16_weights_scaled_by_powers_of_two(
    fmt: str, rows: int, exponents: str
) -> None:
    """A batch of bf16 x against power-of-two block scales: the bf16 weights times 2^e (exact in bf16 while the
    result stays normal) and x, summed in fp32, rounded once: like with like against torch on the same bf16
    values. Scales from 2^-100 to 2^100 stay in range; one scale that would leave bf16's normal range sends the
    call to the row kernels, which give the same product."""
    g = torch.Generator().manual_seed(rows)
    n, k = 70, 576
    p = quantize(torch.randn(n, k, generator=g), fmt)
    if fmt == "ue8m0-fp8":  # fp32 powers of two, one per 128 x 128 block
        p.scales.copy_(
            torch.ldexp(torch.ones_like(p.scales), torch.randint(-100, 100, p.scales.shape, generator=g))
        )
        if exponents == "out-of-range":
            p.scales[0, 0] = 2.0**-125
    else:  # E8M0 codes, one per 32 along K
        p.scales.copy_(torch.randint(27, 227, p.scales.shape, generator=g).to(torch.uint8))
        if exponents == "out-of-range":
            p.scales[0, 0] = 1
    x = torch.randn(rows, k, generator=g).bfloat16()
    y = find_kernel("cpu", fmt)(p)(x)
    assert y is not None and y.dtype == torch.bfloat16
    w = p.dequantize(torch.bfloat16)
    assert torch.equal(w.double(), p.dequantize().double()) or exponents == "out-of-range"  # exact in bf16
    ref = F.linear(x.double(), p.dequantize().double())
    spacing = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().clamp(min=1e-300))[1] - 8)
    assert bool(((y.double() - ref).abs() <= spacing + 1e-6 * ref.abs().amax(dim=1, keepdim=True)).all())


@pytest.mark.parametrize("fmt", cpu.FP8_FORMATS + cpu.MXFP4_FORMATS)
@pytest.mark.parametrize("k", [320, 576, 300])
@pytest.mark.parametrize("rows", [cpu.FUSED_MAX_ROWS_BF16 + 1, cpu.FUSED_MAX_ROWS + 3])
def test_bf16_prefill_dequantizes_into_bf16_exactly_as_the_reference(
    fmt: str, k: int, rows: int, fp8_path: bool
) -> None:
    """Past FUSED_MAX_ROWS_BF16 rows, bf16 x takes torch's bf16 GEMM over weights dequantized into bf16 where the
    CPU has AVX512-BF16: the same weights, bit for bit, as the reference dequantizes, so the same answer."""
    if "fp4" in fmt and k % 32:
        return  # MXFP4 needs whole 32-blocks (the quantizer refuses others)
    g = torch.Generator().manual_seed(k)
    n = 70  # rows of weights: not a multiple of anything the kernels group by
    p = quantize(torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n).unsqueeze(1), fmt)
    x = torch.randn(rows, k, generator=g).bfloat16()
    y = find_kernel("cpu", fmt)(p)(x)
    assert y is not None
    if fp8_path and cpu.dequantizes_into_bf16():
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, F.linear(x, p.dequantize(torch.bfloat16)))
    elif rows > cpu.FUSED_MAX_ROWS:  # fp32 dequantize and GEMM
        _close(y, F.linear(x.float(), p.dequantize()))
    else:  # the fused kernel: the same product, rounded once to bf16
        ref = F.linear(x.float(), p.dequantize())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("fmt,scale", [("fp8-tensor", 300.0), ("fp8-tensor", 2.0**-140), ("mxfp8", 135),
                                       ("mxfp8", 1), ("mxfp4", 200), ("mxfp4", 1), ("mxfp4", 0)])  # fmt: skip
def test_bf16_prefill_keeps_extreme_scales_subnormals_and_nan_codes(
    fmt: str, scale: float, fp8_path: bool
) -> None:
    """Every code under a scale far above 1 or far below it: the bf16 weights are still the reference's, bit for
    bit (no overflow from folding constants into the scale, no subnormal flushed), read back through an identity
    x; NaN codes, kept to weight row 0, make that row's outputs NaN and no other's."""
    p = quantize(torch.randn(16, 256, generator=torch.Generator().manual_seed(5)), fmt)
    codes = torch.arange(p.codes.numel(), dtype=torch.int64).remainder(256).to(torch.uint8).view_as(p.codes)
    if "fp4" not in fmt:  # E4M3 0x7F and 0xFF are NaN: only in row 0
        codes[1:][(codes[1:] & 0x7F) == 0x7F] = 0
    p.codes.copy_(codes)
    p.scales.fill_(scale)  # fp32 for the tensor scale; an E8M0 code for the MX formats
    x = torch.eye(256).bfloat16()  # y[i, n] = weight[n, i], exactly
    y = find_kernel("cpu", fmt)(p)(x)
    assert y is not None
    want = F.linear(x, p.dequantize(torch.bfloat16))
    if "fp4" not in fmt:
        assert bool(want[:, 0].isnan().all()) and not bool(want[:, 1:].isnan().any())
    if fp8_path and cpu.dequantizes_into_bf16():
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    else:  # fp32 dequantize and sgemm: the same weights in fp32, NaN where they are
        torch.testing.assert_close(y, F.linear(x.float(), p.dequantize()), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k", [128, 45])
def test_fp8_kernel_handles_subnormal_codes_and_both_signs(k: int, fp8_path: bool) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, torch.zeros_like(codes), codes)  # no NaN codes in weights
    codes = codes.reshape(2, 128)[:, :k].contiguous()  # k = 45: only a masked tail, no full step
    p = PackedWeight("fp8-tensor", codes, torch.ones(1, 1), (2, k))
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(0))
    kernel = cpu.bind_fp8(p)
    assert kernel is not None
    y = kernel(x)
    assert y is not None
    _close(y, F.linear(x, p.dequantize()))


def test_table_kernel_handles_odd_k_for_packed_4_bit_codes() -> None:
    g = torch.Generator().manual_seed(3)
    p = quantize(torch.randn(40, 301, generator=g), "nvfp4")
    kernel = cpu.bind_lut(p)
    x = torch.randn(2, 301, generator=g)
    assert kernel is not None
    y = kernel(x)
    assert y is not None
    _close(y, F.linear(x, p.dequantize()))


def test_mxfp4_kernel_declines_k_not_divisible_by_32() -> None:
    p = quantize(torch.randn(4, 48), "mxfp4")
    assert cpu.bind_mxfp4(p) is None


def test_registry_answers_by_device_and_format() -> None:
    assert ("cpu", "ue8m0-fp8") in registered()
    assert find_kernel("cuda", "ue8m0-fp8") is None
    assert find_kernel("cpu", "bf16") is None  # plain 16-bit weights: no packed kernel

    @register_kernel("test-device", "mxfp6")
    def fake(w: PackedWeight) -> BoundKernel:
        return lambda x: torch.zeros(x.shape[0], w.shape[0])

    assert find_kernel("test-device", "mxfp6") is fake


def test_without_a_compiler_the_layer_warns_once_and_uses_the_reference_path(monkeypatch, tmp_path) -> None:
    from torch import nn

    from cumulo.formats.linear import PackedLinear
    from cumulo.platform.kernels import build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu, "_kernel", cpu._kernel.fresh())
    layer = PackedLinear.from_linear(nn.Linear(64, 8, bias=False), "ue8m0-fp8")
    x = torch.randn(1, 64)
    with pytest.warns(UserWarning, match="reference path"):
        y = layer(x)
    _close(y, F.linear(x, layer.packed.dequantize()))
    assert cpu.library() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_kernel_runs_joined_weights_with_per_row_scales(fp8_path: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    # parts scaled apart, so a row read with its neighbour's scale would be far off
    parts = [
        quantize(torch.randn(n, 256, generator=g) * s, "ue8m0-fp8")
        for n, s in ((96, 1), (30, 50), (34, 1e-3))
    ]
    joined = concat_rows(parts)
    assert joined.block == (1, 128)
    kernel = cpu.bind_fp8(joined)
    x = torch.randn(1, 256, generator=g).to(dtype)
    assert kernel is not None
    y = kernel(x)
    assert y is not None and y.dtype == dtype
    ref = F.linear(x.float(), joined.dequantize())
    if dtype == torch.float32:
        _close(y, ref)
    else:  # one bf16 rounding of each output
        assert torch.allclose(y.float(), ref, rtol=2**-8, atol=1e-6 * float(ref.abs().amax()))


def test_thread_count_changes_speed_only_not_results() -> None:
    g = torch.Generator().manual_seed(5)
    kernel = cpu.bind_fp8(quantize(torch.randn(300, 256, generator=g), "ue8m0-fp8"))
    x = torch.randn(1, 256, generator=g)
    assert kernel is not None
    try:
        cpu.set_kernel_threads(1)
        assert cpu.kernel_threads() == 1
        one = kernel(x)
        cpu.set_kernel_threads(2)
        two = kernel(x)
    finally:
        cpu.set_kernel_threads(None)
    assert one is not None and two is not None and torch.equal(one, two)


def _bf16_decoded_runs() -> bool:
    features = cpu.cpu_features()
    return cpu.library() is not None and features.avx512_bf16 and features.avx512_vbmi


def _within_one_rounding(y: torch.Tensor, ref: torch.Tensor) -> None:
    """y (bf16) is ref (float64) summed in fp32 in some order and rounded once to bf16: within one bf16 spacing
    of ref, plus fp32 summation error relative to the row's largest output."""
    spacing = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().clamp(min=1e-300))[1] - 8)
    slack = 1e-6 * ref.abs().amax(dim=1, keepdim=True)
    assert bool(((y.double() - ref).abs() <= spacing + slack).all())


def _decoded_call(p: PackedWeight, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The NVFP4 or MXFP6 bf16 kernel called directly: (return code, y)."""
    lib = cpu.library()
    assert lib is not None
    n, k = p.shape
    y = torch.zeros(x.shape[0], n, dtype=torch.bfloat16)
    common = dict(x=x, M=x.shape[0], K=k, codes=p.codes, N=n, scales=p.scales, y=y, threads=2)
    if p.scheme.scale == "nvfp4":
        scale_lut = codec.decode(E4M3FN, torch.arange(256)).float().contiguous()
        rc = lib.cumulo_nvfp4_linear_bf16(**common, scale_lut=scale_lut, tensor_scale=float(p.tensor_scale))
    else:
        values = codec.decode(p.scheme.element, torch.arange(64)).float().contiguous()
        rc = lib.cumulo_mxfp6_linear_bf16(**common, values=values)
    return rc, y


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp6", "mxfp6-e3m2"])
@pytest.mark.parametrize("rows", list(range(1, 17)))
def test_nvfp4_and_mxfp6_bf16_kernels_multiply_the_exact_bf16_weights(fmt: str, rows: int) -> None:
    """bf16 x against NVFP4 (E2M1 x E4M3 block scale, then the fp32 tensor scale) or MXFP6 (E2M3 / E3M2 x E8M0):
    each scaled weight is exact in bf16, so the kernel's answer is x times the reference's weights, summed in fp32,
    rounded once. Scales span their extremes: E4M3 subnormal to 448 and a tensor scale of 2^-90 or 2^90; E8M0
    codes up to the edges of bf16's normal range. Rows 1..16 take the row kernels (below 8) and the batch path;
    the layer picks the same kernel (bit-equal answers)."""
    if not _bf16_decoded_runs():
        pytest.skip("this CPU has no AVX512-BF16 + VBMI")
    g = torch.Generator().manual_seed(rows)
    n, k = 37, 640  # n odd: a partial group of weight rows
    w = torch.randn(n, k, generator=g)
    w[0, :32] = 0.0  # row 0, block 0: one weight, which the largest E8M0 code below takes near bf16's largest
    w[0, 5] = 1.0
    p = quantize(w, fmt)
    if fmt == "nvfp4":
        codes = torch.randint(1, 0x7F, p.scales.shape, generator=g)  # E4M3 0x01 (2^-9) .. 0x7E (448)
        codes[0, :2] = torch.tensor([0x01, 0x7E])
        p.scales.copy_(codes.to(torch.uint8))
        p.tensor_scale.fill_(2.0 ** (-90 if rows % 2 else 90))
    else:
        lo, hi = (4, 252) if fmt == "mxfp6" else (5, 250)  # the E8M0 codes that keep every value normal bf16
        codes = torch.randint(27, 228, p.scales.shape, generator=g)  # 2^-100 .. 2^100
        codes[0, :2] = torch.tensor([hi, lo])
        codes[1, -1] = lo
        p.scales.copy_(codes.to(torch.uint8))
    x = torch.randn(rows, k, generator=g).clamp(-1, 1).bfloat16()  # |x| <= 1: row 0's sums stay finite
    w = p.dequantize()
    assert fmt == "nvfp4" or w[0, :32].abs().max() >= 2.0**126  # the largest code does reach the top
    if fmt == "nvfp4":  # value x block scale is exact in bf16 (the tensor scale goes on the sums)
        unscaled = w.double() / float(p.tensor_scale)
        assert torch.equal(unscaled.bfloat16().double(), unscaled)
    else:
        assert torch.equal(w.bfloat16().double(), w.double())
    rc, y = _decoded_call(p, x)
    assert rc == 0
    ref = F.linear(x.double(), w.double())
    assert bool(torch.isfinite(ref).all()) and ref.abs().max() > 0
    _within_one_rounding(y, ref)
    layer = find_kernel("cpu", fmt)(p)(x)
    assert layer is not None and torch.equal(layer, y)


@pytest.mark.parametrize("fmt,code", [("mxfp6", 3), ("mxfp6", 253), ("mxfp6-e3m2", 4), ("mxfp6-e3m2", 251)])
@pytest.mark.parametrize("rows", [1, 5, 12])
def test_mxfp6_scales_out_of_bf16_range_fall_back_to_the_table_kernel(fmt: str, code: int, rows: int) -> None:
    """One E8M0 scale that would take a scaled value out of bf16's normal range (below 2^-126 or past its
    largest number): the layer does not bind the bf16 kernel and answers through the table kernel, like with like
    against the reference on the same bf16 x."""
    if not _bf16_decoded_runs():
        pytest.skip("this CPU has no AVX512-BF16 + VBMI")
    lib = cpu.library()
    g = torch.Generator().manual_seed(code + rows)
    p = quantize(torch.randn(9, 96, generator=g), fmt)
    values = codec.decode(p.scheme.element, torch.arange(64)).float().contiguous()
    assert lib.cumulo_mxfp6_takes(scales=p.scales, count=p.scales.numel(), values=values) == 1
    p.scales[3, 1] = code
    assert lib.cumulo_mxfp6_takes(scales=p.scales, count=p.scales.numel(), values=values) == 0
    if code > 200:  # keep the reference finite: the block's largest values would overflow
        p.codes[3].zero_()
    x = torch.randn(rows, 96, generator=g).bfloat16()
    y = find_kernel("cpu", fmt)(p)(x)
    assert y is not None and y.dtype == torch.bfloat16
    ref = F.linear(x.double(), p.dequantize().double())
    _within_one_rounding(y, ref)
