"""What a machine offers the pool: its devices, read through the platform layer and matched to catalog chips.

A node describes itself when it joins (`cumulo join`, or the head under `cumulo serve --cluster`) and hands the
description to Ray as node labels (name, device kind, chip id, memory) and resources (one `chip:<id>` resource
per device), so the scheduler and `cumulo nodes` see one heterogeneous pool: CPU nodes of different sizes here,
CUDA or NPU nodes on real hardware.
"""

from __future__ import annotations

import platform as host
import re
import socket
from dataclasses import asdict, dataclass

from cumulo.chips.catalog import LOCAL_ID, Catalog, load_catalog
from cumulo.platform import PLATFORMS, get_platform
from cumulo.platform.cpu import cpu_flags
from cumulo.platform.threads import allowed_cpus, physical_cores

GIB = 1024**3
LABEL_PREFIX = "cumulo-"


@dataclass(frozen=True, slots=True)
class Device:
    kind: str  # platform name: "cpu", "cuda", "npu", ...
    vendor: str
    name: str  # what the driver calls it
    chip: str  # the catalog chip it was matched to
    memory_gb: float
    cores: int  # CPU cores for a CPU; 0 where the platform does not say

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return host.processor() or host.machine()


def match_cpu(flags: frozenset[str], catalog: Catalog) -> str:
    """A calibrated local chip when there is one (`cumulo chips calibrate`), else the generic catalog CPU of the
    same instruction set."""
    if LOCAL_ID in catalog.chips:
        return LOCAL_ID
    return "cpu-avx512-32core" if "avx512f" in flags else "cpu-avx2-2core"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+|[0-9]+", text.lower()))


def match_accelerator(kind: str, name: str, catalog: Catalog) -> str:
    """The catalog chip whose name shares the most words with the driver's name (e.g. "NVIDIA H100 80GB HBM3"
    -> h100-sxm); "unknown-<kind>" when no catalog chip of that kind shares its model word."""
    tokens = re.findall(r"[a-z]+|[0-9]+", name.lower())
    words = set(tokens) | {a + b for a, b in zip(tokens, tokens[1:], strict=False)}  # "h", "100" -> "h100"
    best, score = f"unknown-{kind}", 0
    for chip in catalog.chips.values():
        if chip.kind == "cpu" or chip.units > 1:
            continue
        common = len(words & _words(chip.name)) + (3 if chip.id.split("-")[0] in words else 0)
        if common > score:
            best, score = chip.id, common
    return best if score >= 3 else f"unknown-{kind}"


def local_devices(catalog: Catalog | None = None) -> list[Device]:
    """The devices of this machine that an engine can use: every accelerator the platform layer finds, and
    the CPU."""
    catalog = catalog or load_catalog()
    devices: list[Device] = []
    for kind, cls in PLATFORMS.items():
        if kind == "cpu" or not cls.is_available():
            continue
        for index in range(cls.device_count()):
            p = get_platform(f"{kind}:{index}")
            name = _accelerator_name(kind, index)
            _, total = p.memory_info()
            chip = match_accelerator(kind, name, catalog)
            devices.append(Device(kind, chip.split("-")[0], name, chip, round(total / GIB, 1), 0))
    cpu = get_platform("cpu")
    _, total = cpu.memory_info()
    cores = physical_cores(allowed_cpus())
    devices.append(Device("cpu", "x86" if "avx" in cpu_flags() else host.machine(), cpu_name(),
                          match_cpu(cpu_flags(), catalog), round(total / GIB, 1), cores))  # fmt: skip
    return devices


def _accelerator_name(kind: str, index: int) -> str:
    import torch

    module = getattr(torch, kind, None)
    try:
        return str(module.get_device_name(index))  # type: ignore[union-attr]
    except Exception:
        return f"{kind}:{index}"


def default_node_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


def node_labels(name: str, devices: list[Device]) -> dict[str, str]:
    """Ray node labels for a node: its name and its main device (the first accelerator, else the CPU)."""
    main = devices[0]
    return {
        f"{LABEL_PREFIX}name": _label_value(name),
        f"{LABEL_PREFIX}kind": main.kind,
        f"{LABEL_PREFIX}chip": _label_value(main.chip),
        f"{LABEL_PREFIX}devices": str(sum(1 for d in devices if d.kind == main.kind)),
        f"{LABEL_PREFIX}memory-gb": f"{main.memory_gb:g}",
        f"{LABEL_PREFIX}cores": str(next((d.cores for d in devices if d.kind == "cpu"), 0)),
        f"{LABEL_PREFIX}device": _label_value(main.name),
    }


def node_resources(devices: list[Device]) -> dict[str, float]:
    """One Ray resource per catalog chip id, counting that chip's devices (`chip:cpu-avx2-2core`: 1)."""
    out: dict[str, float] = {}
    main_kind = devices[0].kind
    for d in devices:
        if d.kind == main_kind:
            out[f"chip:{d.chip}"] = out.get(f"chip:{d.chip}", 0) + 1
    return out


def _label_value(text: str) -> str:
    """Ray label values: at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with
    a letter or digit."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:63].strip("-_.")
    return value or "unknown"
