"""Compile C++ kernel sources into a shared library once, cache it, and load it with ctypes; and the one place
Python asks what this CPU can run (`cpu_features`).

A plain C-ABI library (no torch headers) builds in seconds rather than the minute a torch extension takes, so a
fresh machine or CI run does not stall on first use. The cache lives in torch's extension directory
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) under a name hashing the sources, every header they
include (transitively: a header change rebuilds) and the flags; the flags follow the CPU this process runs on
(AVX2/FMA/F16C when it has them, portable code otherwise), so machines sharing a cache each get a build they can
run. Builds write to a temporary file and rename it into place, so concurrent first uses, in threads or
processes, never load a half-written library. Every source and header lives in this directory (SOURCE_DIR).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cumulo.platform.kernels.abi import Kernels

log = logging.getLogger(__name__)

BASE_FLAGS = ["-O3", "-std=gnu++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"]
X86_FLAGS = ["-mavx2", "-mfma", "-mf16c"]

SOURCE_DIR = Path(__file__).parent
_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)

_lock = threading.RLock()


def compile_flags() -> list[str]:
    """BASE_FLAGS, plus the x86 vector extensions when this CPU has all of them (the probe's `avx2`)."""
    if platform.machine() in ("x86_64", "AMD64") and cpu_features().avx2:
        return BASE_FLAGS + X86_FLAGS
    return list(BASE_FLAGS)


def includes(source: Path) -> list[Path]:
    """The headers `source` includes by quoted name, and the ones they include, each once (a missing one raises
    FileNotFoundError: it would fail the build anyway)."""
    found: list[Path] = []
    todo = [source]
    while todo:
        current = todo.pop()
        for name in _INCLUDE.findall(current.read_bytes()):
            header = current.parent / name.decode()
            if header not in found:
                found.append(header)
                todo.append(header)
    return found


def cache_dir() -> Path:
    """Where builds are kept: $TORCH_EXTENSIONS_DIR/cumulo, as torch's own extension builds honour it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "cumulo"


def _as_list(sources: Path | Sequence[Path]) -> list[Path]:
    return [sources] if isinstance(sources, Path) else list(sources)


def build(sources: Path | Sequence[Path], flags: list[str] | None = None, name: str | None = None) -> Path:
    """The cached shared library of `sources` (compiled now if missing), named after `name` (default: the
    first source's stem); RuntimeError if it cannot be built."""
    paths = _as_list(sources)
    flags = compile_flags() if flags is None else flags
    hashed = [*paths, *sorted({h for p in paths for h in includes(p)})]
    digest = hashlib.sha256(
        b"".join(p.name.encode() + p.read_bytes() for p in hashed) + " ".join(flags).encode()
    )
    target = cache_dir() / f"cumulo_{name or paths[0].stem}_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError(
            f"no C++ compiler: {wanted!r} (from $CXX) not found" if wanted else "no g++ on PATH"
        )
    log.warning("building Cumulo CPU kernels (once, a few seconds): %s", ", ".join(p.name for p in paths))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, *map(str, paths), "-o", tmp], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip()[:2000]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(
    sources: Path | Sequence[Path], flags: list[str] | None = None, name: str | None = None
) -> ctypes.CDLL:
    """Build (once per process, under a lock) and load; RuntimeError or OSError when that is impossible."""
    # The flags ask the CPU-feature probe, which is itself loaded here: ask before taking the lock, so that the
    # locks are always taken in one order (a library's, the probe's, this one) and two first uses cannot wait
    # on each other.
    flags = compile_flags() if flags is None else flags
    with _lock:
        return ctypes.CDLL(str(build(sources, flags, name)))


class KernelLibrary:
    """Kernel sources built into one library and loaded on first use. `get()` is the loaded library, or None
    after one warning ("<what> unavailable (<reason>); <fallback>", kept in `reason`) where it cannot be:
    `requires()` gives a reason (a CPU without the instructions the sources need), there is no compiler, or the
    build fails. With CUMULO_DISABLE_CPU_KERNELS set it is None without a warning. Loaded, it offers the named
    `kernels` (abi.Kernels), each with the arguments the library declares; a missing one makes it unavailable."""

    def __init__(
        self,
        sources: Path | Sequence[Path],
        what: str,
        kernels: Sequence[str],
        *,
        name: str | None = None,
        requires: Callable[[], str | None] = lambda: None,
        flags: list[str] | None = None,
        fallback: str = "using torch",
        loader: Callable[..., ctypes.CDLL] | None = None,
        warn: bool = True,
    ) -> None:
        self.sources, self.what, self.kernels, self.name = _as_list(sources), what, tuple(kernels), name
        self.requires, self.flags, self.fallback, self.warn = requires, flags, fallback, warn
        self.loader = loader or load
        self.reason: str | None = None
        self._lib: Kernels | None = None
        self._tried = False
        self._lock = threading.Lock()

    def fresh(self) -> KernelLibrary:
        """The same library, not loaded yet (tests use it to start over)."""
        return KernelLibrary(
            self.sources, self.what, self.kernels, name=self.name, requires=self.requires, flags=self.flags,
            fallback=self.fallback, loader=self.loader, warn=self.warn,
        )  # fmt: skip

    def get(self) -> Kernels | None:
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
                    self._lib = Kernels(self.loader(self.sources, self.flags, self.name), self.kernels)
                except (OSError, RuntimeError, AttributeError, ValueError, subprocess.SubprocessError) as exc:
                    self.reason = str(exc)
                    if self.warn:
                        warnings.warn(f"{self.what} unavailable ({exc}); {self.fallback}", stacklevel=3)
            self._tried = True
        return self._lib


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU runs, as the kernels' probe (cpu_features.h) sees it; all False where it cannot be asked."""

    avx2: bool = False  # with FMA and F16C: what the x86 sources are compiled for
    avx512: bool = False  # F + BW + VL
    avx512_vbmi: bool = False
    avx512_bf16: bool = False  # vdpbf16ps and vcvtneps2bf16 (with avx512)
    avx512_vnni: bool = False  # vpdpbusd, u8 x s8 -> s32 (the int8 GEMM)


# The probe builds with the portable flags: it must run on any CPU, before the flags for this one are known.
_probe = KernelLibrary(
    SOURCE_DIR / "cpu_features.cpp",
    "CPU feature probe",
    ["cumulo_cpu_features"],
    flags=BASE_FLAGS,
    warn=False,
)
_features: CpuFeatures | None = None


def cpu_features() -> CpuFeatures:
    """The one place Python asks the CPU-feature probe (asked once; the bits are cpu_features.h's). Build
    flags, each library's requirements and the kernels' Python-side path choices all read it.

    TODO: `CpuPlatform.supports_dtype` (platform/cpu.py, being reworked by another change) still reads
    /proc/cpuinfo for its dtype hint (bf16 where AVX512-BF16 or AMX); on x86 it could ask this instead, keeping
    /proc/cpuinfo for Arm's flags and for machines without a compiler."""
    global _features
    if _features is None:
        lib = _probe.get()
        bits = lib.cumulo_cpu_features() if lib is not None else 0
        _features = CpuFeatures(*(bool(bits & 1 << i) for i in range(5)))
    return _features


def requires_avx2() -> str | None:
    """None on an x86 CPU with AVX2, FMA and F16C, else why not: for `KernelLibrary(requires=...)`."""
    if cpu_features().avx2:
        return None
    return f"no CPU feature probe: {_probe.reason}" if _probe.reason else "this CPU lacks AVX2/FMA/F16C"
