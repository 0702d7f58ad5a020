"""How many bytes the paged KV cache may take: GiB on the CPU, a fraction of free memory on accelerators.

The platform knows its memory; `cumulo.engine.kv_sizing.plan_kv_cache` turns these bytes into blocks.
"""

from __future__ import annotations

from cumulo.errors import InvalidRequest
from cumulo.platform.base import Platform

GIB = 1 << 30
# On the CPU the cache shares memory with the OS, the weights and everything else: stay modest by default.
CPU_DEFAULT_GIB = 4.0
CPU_DEFAULT_FRACTION = 0.25
# On an accelerator the weights are loaded already when this is asked; leave room for activations.
ACCELERATOR_DEFAULT_FRACTION = 0.8


def kv_cache_budget_bytes(platform: Platform, gib: float | None = None, fraction: float | None = None) -> int:
    """The KV cache size in bytes: `gib` GiB if given, else `fraction` of free memory if given, else the
    platform's default: min(4 GiB, 25% of available memory) on the CPU, 80% of free memory on accelerators."""
    if gib is not None and fraction is not None:
        raise InvalidRequest("give the KV cache size in GiB or as a fraction of free memory, not both")
    if gib is not None:
        if gib <= 0:
            raise InvalidRequest(f"KV cache size must be positive, not {gib} GiB")
        return int(gib * GIB)
    free, _ = platform.memory_info()
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise InvalidRequest(f"KV cache fraction must be in (0, 1], not {fraction}")
        return int(free * fraction)
    if platform.is_accelerator:
        return int(free * ACCELERATOR_DEFAULT_FRACTION)
    return int(min(CPU_DEFAULT_GIB * GIB, free * CPU_DEFAULT_FRACTION))
