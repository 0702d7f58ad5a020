"""Compile a one-file C++ kernel into a shared library once, cache it, and load it with ctypes.

A plain C-ABI library (no torch headers) builds in seconds rather than the minute a torch extension takes, so a
fresh machine or CI run does not stall on first use. The cache lives in torch's extension directory
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) under a name hashing the source and the flags; the
flags follow the CPU this process runs on (AVX2/FMA/F16C when it has them, portable code otherwise), so machines
sharing a cache each get a build they can run. Builds write to a temporary file and rename it into place, so
concurrent first uses, in threads or processes, never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

BASE_FLAGS = ["-O3", "-std=gnu++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"]
X86_FLAGS = ["-mavx2", "-mfma", "-mf16c"]

_lock = threading.Lock()


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def compile_flags() -> list[str]:
    """BASE_FLAGS, plus the x86 vector extensions when this CPU has all of them."""
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= cpu_flags():
        return BASE_FLAGS + X86_FLAGS
    return list(BASE_FLAGS)


def cache_dir() -> Path:
    """Where builds are kept: $TORCH_EXTENSIONS_DIR/cumulo, as torch's own extension builds honour it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "cumulo"


def build(source: Path, flags: list[str] | None = None) -> Path:
    """The cached shared library for `source` (compiled now if missing); RuntimeError if it cannot be built."""
    flags = compile_flags() if flags is None else flags
    # The headers beside the source are part of it (kernels include them by relative path).
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"cumulo_{source.stem}_{digest}.so"
    if target.exists():
        return target
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError(
            f"no C++ compiler: {wanted!r} (from $CXX) not found" if wanted else "no g++ on PATH"
        )
    log.warning("building Cumulo CPU kernels (once, a few seconds): %s", source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip()[:2000]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, flags: list[str] | None = None) -> ctypes.CDLL:
    """Build (once per process, under a lock) and load; RuntimeError or OSError when that is impossible."""
    with _lock:
        return ctypes.CDLL(str(build(source, flags)))


class KernelLibrary:
    """One kernel source, built and loaded on first use. `get()` is the loaded library, or None after one
    warning ("<what> unavailable (<reason>); <fallback>") where it cannot be: `requires()` gives a reason (a CPU
    without the instructions the source needs), there is no compiler, or the build fails. With
    CUMULO_DISABLE_CPU_KERNELS set it is None without a warning. `configure` sets the ctypes signatures."""

    def __init__(
        self,
        source: Path,
        what: str,
        configure: Callable[[ctypes.CDLL], None],
        *,
        requires: Callable[[], str | None] = lambda: None,
        flags: list[str] | None = None,
        fallback: str = "using torch",
        loader: Callable[[Path, list[str] | None], ctypes.CDLL] | None = None,
    ) -> None:
        self.source, self.what, self.configure = source, what, configure
        self.requires, self.flags, self.fallback = requires, flags, fallback
        self.loader = loader or load
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = threading.Lock()

    def fresh(self) -> KernelLibrary:
        """The same library, not loaded yet (tests use it to start over)."""
        return KernelLibrary(
            self.source, self.what, self.configure, requires=self.requires, flags=self.flags,
            fallback=self.fallback, loader=self.loader,
        )  # fmt: skip

    def get(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        with self._lock:
            if self._tried:
                return self._lib
            if not os.environ.get("CUMULO_DISABLE_CPU_KERNELS"):
                try:
                    reason = self.requires()
                    if reason:
                        raise RuntimeError(reason)
                    lib = self.loader(self.source, self.flags)
                    self.configure(lib)
                    self._lib = lib
                except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
                    warnings.warn(f"{self.what} unavailable ({exc}); {self.fallback}", stacklevel=3)
            self._tried = True
        return self._lib


def address(fn: Callable) -> int:
    """A loaded C function's address, for a decode-graph op record (cumulo.platform.kernels.graph)."""
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


def f32_bits(value: float) -> int:
    """An fp32 argument as the int64 the C op forms read it from (its IEEE bit pattern)."""
    return struct.unpack("=I", struct.pack("=f", value))[0]


def requires_avx2() -> str | None:
    """None on an x86 CPU with AVX2 (as torch sees it), else why not: for `KernelLibrary(requires=...)`."""
    import torch

    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return None
    return "this CPU has no AVX2"
