"""Device platforms: pick one from a device string ("auto", "cpu", "cuda:1", "npu:0", ...) and ask it things.

Core code holds a `Platform` and never names a vendor; see `base.Platform` for what it offers.
"""

from __future__ import annotations

import re

from cumulo.errors import InvalidRequest
from cumulo.platform.accelerators import (
    CudaPlatform,
    MluPlatform,
    MpsPlatform,
    MusaPlatform,
    NpuPlatform,
    XpuPlatform,
)
from cumulo.platform.base import AttentionFn, Platform
from cumulo.platform.budget import kv_cache_budget_bytes
from cumulo.platform.cpu import CpuPlatform
from cumulo.platform.threads import configure_cpu_threads, default_cpu_threads

# "auto" takes the first available, in this order.
ACCELERATORS: tuple[type[Platform], ...] = (
    CudaPlatform,
    NpuPlatform,
    XpuPlatform,
    MpsPlatform,
    MluPlatform,
    MusaPlatform,
)
PLATFORMS: dict[str, type[Platform]] = {p.name: p for p in (*ACCELERATORS, CpuPlatform)}

_DEVICE = re.compile(r"([a-z]+)(?::(\d+))?")

__all__ = [
    "ACCELERATORS",
    "PLATFORMS",
    "AttentionFn",
    "CpuPlatform",
    "CudaPlatform",
    "MluPlatform",
    "MpsPlatform",
    "MusaPlatform",
    "NpuPlatform",
    "Platform",
    "XpuPlatform",
    "configure_cpu_threads",
    "default_cpu_threads",
    "get_platform",
    "kv_cache_budget_bytes",
]


def get_platform(device: str = "auto") -> Platform:
    """The platform for a device string; "auto" is the first available accelerator, else the CPU."""
    spec = device.strip().lower()
    if spec == "auto":
        for kind in ACCELERATORS:
            if kind.is_available():
                return kind(0)
        return CpuPlatform()
    match = _DEVICE.fullmatch(spec)
    kind = PLATFORMS.get(match.group(1)) if match else None
    if match is None or kind is None:
        choices = ", ".join(f"{name}[:N]" if cls.numbered else name for name, cls in PLATFORMS.items())
        raise InvalidRequest(f"unknown device '{device}': use auto, {choices}")
    index = int(match.group(2)) if match.group(2) is not None else 0
    if not kind.numbered and index != 0:
        raise InvalidRequest(f"device '{device}': {kind.name} has no numbered devices")
    if not kind.is_available():
        raise InvalidRequest(f"device '{device}' is not available: {kind.unavailable_reason()}")
    count = kind.device_count()
    if kind.numbered and index >= count:
        raise InvalidRequest(
            f"device '{device}' does not exist: this machine has {count} {kind.name} device(s)"
        )
    return kind(index)
