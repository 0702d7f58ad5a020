"""The kernel builds: a library is cached under a hash of its sources, every header they include (the headers'
own includes too) and the flags, so editing any of them builds anew."""

from __future__ import annotations

from pathlib import Path

import pytest

from cumulo.platform.kernels import build


def _write(d: Path) -> Path:
    (d / "inner.h").write_text("#pragma once\ninline int inner() { return 1; }\n")
    (d / "outer.h").write_text(
        '#pragma once\n#include "inner.h"\ninline int outer() { return inner() + 1; }\n'
    )
    (d / "unrelated.h").write_text("#pragma once\n")
    source = d / "k.cpp"
    source.write_text(
        '#include <stdint.h>\n#include "outer.h"\nextern "C" int64_t two(void) { return outer(); }\n'
    )
    return source


def test_includes_follow_headers_that_include_headers(tmp_path: Path) -> None:
    source = _write(tmp_path)
    assert build.includes(source) == [tmp_path / "outer.h", tmp_path / "inner.h"]
    (tmp_path / "outer.h").write_text('#include "missing.h"\n')
    with pytest.raises(FileNotFoundError):
        build.includes(source)


def test_a_header_change_builds_a_new_library(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = _write(tmp_path)
    first = build.build(source, build.BASE_FLAGS)
    assert build.build(source, build.BASE_FLAGS) == first  # cached
    (tmp_path / "unrelated.h").write_text("#pragma once\n// edited\n")
    assert build.build(source, build.BASE_FLAGS) == first  # not included: no rebuild
    (tmp_path / "inner.h").write_text("#pragma once\ninline int inner() { return 2; }\n")
    second = build.build(source, build.BASE_FLAGS)
    assert second != first and second.exists()
    import ctypes

    assert ctypes.CDLL(str(second)).two() == 3


def test_first_uses_from_many_threads_on_a_fresh_cache_all_load(tmp_path: Path, monkeypatch) -> None:
    """The first build of a process asks the CPU-feature probe, itself a library to build: libraries built at
    once from several threads, with the probe not built yet, must neither deadlock nor fail."""
    from concurrent.futures import ThreadPoolExecutor

    from cumulo.platform.kernels import rms_norm, rope_cache

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(build, "_probe", build._probe.fresh())
    monkeypatch.setattr(build, "_features", None)
    libraries = [rms_norm._kernel.fresh(), rope_cache._kernel.fresh(), build._probe]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lib.get) for lib in libraries]
        results = [f.result(timeout=300) for f in futures]
    assert all(r is not None for r in results)
