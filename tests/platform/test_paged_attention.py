"""The fused CPU paged decode attention against a plain gather + softmax reference, across the shapes the engine
meets: fp32 and bf16 caches, GQA groups, ragged and windowed contexts, shuffled block tables, 1 and 2 threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import cumulo.platform.kernels.build as build
import cumulo.platform.kernels.paged_attention as pa
from cumulo.models.attention import AttentionContext, KVCache, _decode
from cumulo.platform.kernels import available, paged_decode_attention

BLOCK = 16
DIM = 64


def reference(q, k_cache, v_cache, tables, lens, scale, window):
    """Per sequence: gather its keys, keep the window, softmax in float64; each head reads its kv head."""
    batch, heads, _ = q.shape
    group = heads // k_cache.shape[0]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        start = max(0, n - window) if window else 0
        k = k_cache[:, tables[b]].flatten(1, 2)[:, start:n].double().repeat_interleave(group, dim=0)
        v = v_cache[:, tables[b]].flatten(1, 2)[:, start:n].double().repeat_interleave(group, dim=0)
        scores = (k @ q[b].double()[:, :, None])[..., 0] * scale  # [heads, keys]
        out[b] = (torch.softmax(scores, dim=-1)[:, None, :] @ v)[:, 0]
    return out


def make_case(lens, heads, kv_heads, dtype, seed=0, num_blocks=None, dim=DIM):
    """Random cache and queries; each sequence's blocks are a random, non-contiguous choice of the cache."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // BLOCK) for n in lens) + 1  # one spare column: padding the kernel must not read
    num_blocks = num_blocks or len(lens) * max_blocks + 5
    k_cache = torch.randn(kv_heads, num_blocks, BLOCK, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, BLOCK, dim, generator=gen).to(dtype)
    q = (torch.randn(len(lens), heads, dim, generator=gen) * 2).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = perm[: len(lens) * max_blocks].view(len(lens), max_blocks).clone()
    for b, n in enumerate(lens):
        tables[b, -(-n // BLOCK) :] = -7  # padded entries are arbitrary, even invalid
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int64)


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2)}
LENS = [1, 15, 16, 17, 100, 333, 64]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    """Torch's thread count, which the kernel follows; work too small to pay for threads is threaded anyway."""
    monkeypatch.setattr(pa, "MIN_PAIRS_PER_THREAD", 0)
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def test_kernel_is_available_for_cpu_fp32_and_bf16():
    assert available(torch.float32, "cpu") and available(torch.bfloat16, torch.device("cpu"))
    assert not available(torch.float16, "cpu")
    assert not available(torch.float32, "cuda:0")
    assert not available(torch.float32, "cpu", head_dim=60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "heads,kv_heads", [(4, 4), (9, 3), (8, 2), (10, 2)], ids=["mha", "gqa3", "gqa4", "gqa5"]
)
@pytest.mark.parametrize("window", [None, 20, 200], ids=["full", "window20", "window200"])
def test_matches_reference_for_ragged_contexts(dtype, heads, kv_heads, window, threads):
    q, k, v, tables, lens = make_case(LENS, heads, kv_heads, dtype)
    out = paged_decode_attention(q, k, v, tables, lens, 0.125, window)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, tables, lens, 0.125, window), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 5, 100], ids=["full", "window5", "window100"])
@pytest.mark.parametrize("n", [1, 40, 700, 2049])
def test_single_long_sequence_split_across_threads_matches_reference(n, window, dtype, threads):
    """At batch 1 the context is split between threads and the partial softmaxes merged."""
    q, k, v, tables, lens = make_case([n], 9, 3, dtype, seed=n)
    out = paged_decode_attention(q, k, v, tables, lens, 0.125, window)
    torch.testing.assert_close(out.double(), reference(q, k, v, tables, lens, 0.125, window), **TOL[dtype])


@pytest.mark.parametrize("dim", [8, 72, 128, 256])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_other_head_dims_and_group_sizes_match_reference(dim, heads):
    q, k, v, tables, lens = make_case([7, 45], heads, 1, torch.float32, seed=dim, dim=dim)
    out = paged_decode_attention(q, k, v, tables, lens, dim**-0.5, None)
    expected = reference(q, k, v, tables, lens, dim**-0.5, None)
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])


def test_unsupported_head_dim_is_refused():
    q, k, v, tables, lens = make_case([7], 2, 1, torch.float32, dim=60)
    with pytest.raises(ValueError, match="multiple of 8"):
        paged_decode_attention(q, k, v, tables, lens, 1.0, None)


def test_strided_query_and_cache_views_are_read_in_place():
    """q as a slice of a fused qkv row and the cache as one layer of a bigger tensor, as the engine has them."""
    q, k, v, tables, lens = make_case([5, 50], 9, 3, torch.float32, seed=3)
    qkv = torch.cat([q.flatten(1), torch.zeros(2, 7)], dim=1)
    q_view = qkv[:, : 9 * DIM].view(2, 9, DIM)
    layers = torch.stack([torch.zeros_like(k), k, v])
    out = paged_decode_attention(q_view, layers[1], layers[2], tables, lens, 0.3, None)
    torch.testing.assert_close(
        out.double(), reference(q, k, v, tables, lens, 0.3, None), **TOL[torch.float32]
    )


def test_large_scores_do_not_overflow():
    q, k, v, tables, lens = make_case([300], 4, 4, torch.float32, seed=5)
    out = paged_decode_attention(q * 40, k, v, tables, lens, 1.0, None)
    torch.testing.assert_close(
        out.double(), reference(q * 40, k, v, tables, lens, 1.0, None), **TOL[torch.float32]
    )


def test_bad_block_table_entry_raises_instead_of_reading_out_of_bounds():
    q, k, v, tables, lens = make_case([40], 4, 4, torch.float32)
    tables[0, 1] = k.shape[1]
    with pytest.raises(ValueError, match="outside the KV cache"):
        paged_decode_attention(q, k, v, tables, lens, 0.125, None)


def test_context_longer_than_block_table_raises():
    q, k, v, tables, lens = make_case([40], 4, 4, torch.float32)
    with pytest.raises(ValueError, match="exceeds its block table"):
        paged_decode_attention(q, k, v, tables, lens + 100, 0.125, None)


def test_empty_batch_returns_empty():
    _, k, v, _, _ = make_case([4], 4, 4, torch.float32)
    q = torch.empty(0, 4, DIM)
    out = paged_decode_attention(
        q, k, v, torch.empty(0, 3, dtype=torch.int64), torch.empty(0, dtype=torch.int64), 1.0, None
    )
    assert out.shape == (0, 4, DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 24], ids=["full", "window24"])
def test_is_a_drop_in_for_the_engine_decode(dtype, window):
    """Same inputs as the engine's `_decode` (its KVCache layout, its context), same answer."""
    lens = [3, 16, 37, 90]
    q, k, v, tables, lens_t = make_case(lens, 9, 3, dtype, seed=11)
    cache = KVCache(2, k.shape[1], BLOCK, 3, DIM, dtype, "cpu")
    cache.k[1].copy_(k)
    cache.v[1].copy_(v)
    tables = tables.clamp(min=0)  # the engine's padding must index the cache: it gathers whole rows
    ctx = AttentionContext(cache, num_decode=4, decode_block_tables=tables, decode_context_lens=lens_t)
    expected = _decode(q, ctx, 1, 0.125, window)
    out = paged_decode_attention(q, cache.k[1], cache.v[1], tables, lens_t, 0.125, window)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, expected, **tol)


@pytest.fixture
def fresh_kernel(monkeypatch):
    """The module as if nothing had been loaded yet (restored afterwards)."""
    monkeypatch.setattr(pa, "_kernel", pa._kernel.fresh())
    return pa


def test_failed_build_makes_kernel_unavailable_with_a_warning(fresh_kernel, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no g++ on PATH")

    monkeypatch.setattr(fresh_kernel, "load", no_compiler)
    with pytest.warns(UserWarning, match="no g\\+\\+ on PATH"):
        assert not available(torch.float32, "cpu")
    assert not available(torch.bfloat16, "cpu")  # decided once, no second warning or build attempt
    with pytest.raises(RuntimeError, match="not available"):
        paged_decode_attention(*make_case([4], 4, 4, torch.float32)[:5], 1.0, None)


def test_disable_switch_turns_kernel_off(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CUMULO_DISABLE_CPU_KERNELS", "1")
    assert not available(torch.float32, "cpu")


def test_missing_compiler_and_compile_errors_raise_runtime_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        build.build(source)
    monkeypatch.delenv("CXX")
    with pytest.raises(RuntimeError, match="failed"):
        build.build(source)
    assert not list((tmp_path / "ext" / "cumulo").iterdir())  # no half-written library left behind


def test_concurrent_first_use_loads_one_library(fresh_kernel):
    with ThreadPoolExecutor(4) as pool:
        libs = list(pool.map(lambda _: fresh_kernel.library(), range(8)))
    assert libs[0] is not None and all(lib is libs[0] for lib in libs)
