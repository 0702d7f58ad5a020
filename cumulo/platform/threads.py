"""How many threads PyTorch should use on the CPU: physical cores we may run on, capped by the cgroup quota.

Hyper-threads share a core's vector units, so a matmul-bound decode gains nothing from them and loses to
contention; a container's CPU quota caps useful threads below what the affinity mask shows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from cumulo.errors import InvalidRequest

_interop_set = False


def configure_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `n`, or to `default_cpu_threads()` when None; returns the count.

    An explicit OMP_NUM_THREADS in the environment wins over detection (the user asked for it).
    Inter-op threads are set to 1 once: the engine runs one graph at a time, and torch allows the call only
    before any parallel work has started.
    """
    global _interop_set
    if n is None:
        n = _env_threads() or default_cpu_threads()
    if n < 1:
        raise InvalidRequest(f"threads must be at least 1, not {n}")
    torch.set_num_threads(n)
    if not _interop_set:
        _interop_set = True
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # parallel work already ran in this process; torch keeps its pool, which is harmless
    return n


def default_cpu_threads(
    sysfs: Path = Path("/sys/devices/system/cpu"), cgroup: Path = Path("/sys/fs/cgroup")
) -> int:
    cpus = allowed_cpus()
    threads = physical_cores(cpus, sysfs)
    quota = cgroup_cpu_quota(cgroup)
    if quota is not None:
        threads = min(threads, max(1, math.ceil(quota)))
    return max(1, threads)


def allowed_cpus() -> set[int]:
    """Logical CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct (package, core) pairs among `cpus`; `len(cpus)` where the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup grants (v2 cpu.max, then v1 cfs quota/period), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
