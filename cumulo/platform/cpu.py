"""The CPU platform: memory from /proc/meminfo and the cgroup limit, dtype hints from the CPU's feature flags."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from cumulo.platform.base import AttentionFn, LinearFn, NormFn, Platform, RopeCacheFn

# A cgroup v2 "memory.max" of "max", or a v1 limit this large, means "no limit".
_NO_LIMIT = 1 << 60


class CpuPlatform(Platform):
    name = "cpu"
    dist_backend = "gloo"
    numbered = False
    is_accelerator = False

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> tuple[int, int]:
        free, total = read_meminfo() or _sysconf_memory()
        limit = cgroup_memory()
        if limit is not None:
            # In a container the cgroup limit binds before the host's free memory does.
            free, total = min(free, limit[0]), min(total, limit[1])
        return free, total

    def paged_decode_attention(self, dtype: torch.dtype, head_dim: int) -> AttentionFn | None:
        from cumulo.platform import kernels

        if kernels.available(dtype, self.torch_device, head_dim):
            return kernels.paged_decode_attention
        return None

    def dense_linear(self, dtype: torch.dtype) -> LinearFn | None:
        from cumulo.platform.kernels import gemv

        if not gemv.available():
            return None
        return {torch.bfloat16: gemv.bf16_linear, torch.float32: gemv.f32_linear}.get(dtype)

    def rms_norm(self, dtype: torch.dtype) -> NormFn | None:
        from cumulo.platform.kernels import rms_norm

        return rms_norm.rms_norm if dtype in rms_norm.DTYPES and rms_norm.available() else None

    def rope_and_cache(self, dtype: torch.dtype) -> RopeCacheFn | None:
        from cumulo.platform.kernels import rope_cache

        return rope_cache.rope_and_cache if dtype in rope_cache.DTYPES and rope_cache.available() else None

    def graph_recorder(self, dtype: torch.dtype) -> type | None:
        from cumulo.platform.kernels import graph

        return graph.Graph if dtype in graph.DTYPES and graph.available() else None

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        flags = cpu_flags()
        if dtype in (torch.float32, torch.float64):
            return True
        if dtype == torch.bfloat16:
            # x86: AVX512-BF16 or AMX; Arm: the BF16 extension. Without them bf16 matmuls are emulated.
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        if dtype == torch.float16:
            return bool(flags & {"avx512_fp16", "amx_fp16", "asimdhp", "fphp"})
        return False


def read_meminfo(path: Path = Path("/proc/meminfo")) -> tuple[int, int] | None:
    """(available, total) bytes from Linux's meminfo, or None where there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * 1024  # meminfo counts kB
    if "MemTotal" not in fields:
        return None
    available = fields.get("MemAvailable", fields.get("MemFree", 0) + fields.get("Cached", 0))
    return available, fields["MemTotal"]


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(free, limit) bytes under this process's cgroup memory limit (v2, then v1), or None if unlimited."""
    for limit_file, usage_file in (
        (root / "memory.max", root / "memory.current"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),
    ):
        try:
            raw = limit_file.read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= _NO_LIMIT:
            return None
        limit = int(raw)
        try:
            used = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            used = 0
        return max(limit - used, 0), limit
    return None


def _sysconf_memory() -> tuple[int, int]:
    """Portable fallback (macOS has no /proc): total from sysconf; free where the OS reports it."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        free = total // 2  # no report: assume half, a guess that keeps budgets modest
    return free, total


@functools.cache
def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Feature flags of the first CPU ("flags" on x86, "Features" on Arm); empty where unknown."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()
