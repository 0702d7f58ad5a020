"""Each kernel's arguments are declared once, in its C source (kernel.h); Python builds the argument array from
that declaration by name. These tests guard the seam: every kernel's declaration reads back, a call that names
its arguments wrongly never reaches C, and a kernel called eagerly and the same kernel replayed from a decode
graph (two uses of one array) give the same bits."""

from __future__ import annotations

import pytest
import torch

from cumulo.formats.kernels import cpu as format_kernels
from cumulo.formats.kernels import find_kernel
from cumulo.formats.quantize import quantize
from cumulo.platform.kernels import abi, build, gemv, graph, paged_attention, rms_norm, rope_cache

pytestmark = pytest.mark.skipif(
    not graph.available(), reason="no C++ compiler (or no AVX2) for the CPU kernels"
)

LIBRARIES = {
    "gemv": gemv.library,
    "rms_norm": rms_norm.library,
    "rope_cache": rope_cache.library,
    "paged_attention": paged_attention.library,
    "graph": graph.library,
    "formats": format_kernels.library,
}


@pytest.mark.parametrize("name", LIBRARIES)
def test_every_kernel_declares_arguments_python_can_build(name: str) -> None:
    lib = LIBRARIES[name]()
    assert lib is not None
    for kernel in lib:
        assert kernel.names and len(set(kernel.names)) == len(kernel.names)
        assert all(
            c_type.endswith("*") or c_type in ("int64_t", "int", "float") for c_type, _ in kernel.fields
        )
        # one int64 slot per declared argument, in declaration order
        values = {n: i + 1 for i, n in enumerate(kernel.names)}
        assert kernel.args(**values) == [
            abi.f32_bits(v) if t == "float" else v
            for (t, _), v in zip(kernel.fields, values.values(), strict=True)
        ]


def test_the_rms_norm_declaration_is_the_one_its_source_writes() -> None:
    lib = rms_norm.library()
    assert lib is not None
    assert lib.cumulo_rms_norm.fields == [
        ("const void*", "x"), ("const void*", "w"), ("void*", "y"), ("int64_t", "rows"), ("int64_t", "dim"),
        ("float", "eps"), ("float", "offset"), ("int", "bf16"), ("int", "threads"),
    ]  # fmt: skip


def test_a_call_with_a_missing_unknown_or_mistyped_argument_never_reaches_the_kernel() -> None:
    lib = rms_norm.library()
    assert lib is not None
    x, w = torch.randn(2, 8), torch.ones(8)
    y = torch.full_like(x, 7.0)
    good = rms_norm.args(x, w, y, 1e-6, 0.0, threads=1)
    with pytest.raises(TypeError, match=r"missing arguments \['eps'\]"):
        lib.cumulo_rms_norm(**{k: v for k, v in good.items() if k != "eps"})
    with pytest.raises(TypeError, match=r"unknown \['stride'\]"):
        lib.cumulo_rms_norm(**good, stride=8)
    with pytest.raises(TypeError, match="rows is an integer argument, got Tensor"):
        lib.cumulo_rms_norm(**dict(good, rows=torch.tensor(2)))
    with pytest.raises(TypeError, match="unknown"):
        lib.cumulo_rms_norm.partial(rowz=2)
    assert bool((y == 7.0).all())  # nothing was written
    assert lib.cumulo_rms_norm(**good) == 0
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (8,), w, 1e-6))


def _replayed(op: abi.Op) -> None:
    g = graph.Graph()
    g.add(op)
    g.run()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_norm_and_rotary_kernels_replay_the_eager_call_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 96, generator=gen).to(dtype)
    w = torch.randn(40, 96, generator=gen).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype)
    linear = gemv.bf16_linear if dtype == torch.bfloat16 else gemv.f32_linear
    y = torch.empty(3, 40, dtype=dtype)
    op = gemv.graph_op(x, w, b, y)
    assert op is not None
    _replayed(op)
    assert torch.equal(y, linear(x, w, b))

    g = graph.Graph()
    norm_w = torch.rand(96, generator=gen).to(dtype)
    normed = torch.empty_like(x)
    g.rms_norm(x=x, weight=norm_w, y=normed, eps=1e-5, offset=1.0)
    r, summed, after = torch.randn(3, 96, generator=gen).to(dtype), x.clone(), torch.empty_like(x)
    g.add_rms_norm(x=summed, r=r, weight=norm_w, y=after, eps=1e-5, offset=0.0)
    g.run()
    assert torch.equal(normed, rms_norm.rms_norm(x, norm_w, 1e-5, 1.0))
    assert torch.equal(summed, x + r)
    assert torch.equal(after, rms_norm.rms_norm(x + r, norm_w, 1e-5, 0.0))

    heads, kv_heads, dim = 2, 1, 16
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    angles = torch.rand(8, dim // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    positions, slots = torch.tensor([0, 5, 7]), torch.tensor([3, 0, 6])
    caches = [torch.zeros(kv_heads, 2, 4, dim, dtype=dtype) for _ in range(4)]
    want_q = rope_cache.rope_and_cache(qkv, positions, cos, sin, caches[0], caches[1], slots, heads, kv_heads)
    q = torch.empty(3, heads, dim, dtype=dtype)
    g = graph.Graph()
    g.rope_and_cache(qkv=qkv, positions=positions, cos=cos, sin=sin, k_cache=caches[2], v_cache=caches[3],
                     slots=slots, q=q, heads=heads, kv_heads=kv_heads)  # fmt: skip
    g.run()
    assert want_q is not None and torch.equal(q, want_q)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])

    tables, lens = torch.tensor([[1, 0], [0, 1], [1, 1]]), torch.tensor([5, 8, 3])
    want = paged_attention.paged_decode_attention(q, caches[0], caches[1], tables, lens, 0.25, None)
    out = torch.empty_like(q)
    g = graph.Graph()
    g.attention(q=q, k_cache=caches[0], v_cache=caches[1], tables=tables, lens=lens, out=out, scale=0.25,
                window=None, threads=torch.get_num_threads())  # fmt: skip
    g.run()
    assert torch.equal(out, want)


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", "fp8", "mxfp4", "hif8", "mxint8", "nvfp4", "mxfp6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_format_kernels_replay_the_eager_call_bit_for_bit(fmt: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    p = quantize(torch.randn(48, 256, generator=gen), fmt)
    kernel = find_kernel("cpu", fmt)(p)
    x = torch.randn(3, 256, generator=gen).to(dtype)
    y = torch.empty(3, 48, dtype=dtype)
    op = kernel.graph_op(x, y)
    assert op is not None
    _replayed(op)
    assert torch.equal(y, kernel(x))


def test_the_feature_probe_agrees_with_the_operating_system() -> None:
    """The probe the kernels and Python share (cpu_features.h) against the CPU flags Linux reports."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    flags = next(
        (set(line.split(":")[1].split()) for line in text.splitlines() if line.startswith("flags")), None
    )
    if flags is None:
        pytest.skip("not an x86 CPU")
    f = build.cpu_features()
    assert f.avx2 == ({"avx2", "fma", "f16c"} <= flags)
    assert f.avx512 == ({"avx512f", "avx512bw", "avx512vl"} <= flags)
    assert f.avx512_vbmi == ("avx512vbmi" in flags)
    assert f.avx512_bf16 == ("avx512_bf16" in flags)
    assert f.avx512_vnni == ("avx512_vnni" in flags)
