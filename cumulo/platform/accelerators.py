"""Accelerator platforms: CUDA (and ROCm), Ascend NPU, Intel XPU, Apple MPS, Cambricon MLU, Moore Threads MUSA.

Each vendor exposes a `torch.<name>` module shaped like `torch.cuda` (out of tree ones once their package
`torch_npu`, `torch_mlu` or `torch_musa` is imported), so one class drives them all and each subclass states
only its names and differences. This file is the only place that names a vendor's module.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import ClassVar

import torch

from cumulo.platform.base import Platform


class TorchModulePlatform(Platform):
    """A device kind driven through `torch.<name>` (is_available, device_count, synchronize, mem_get_info)."""

    vendor_package: ClassVar[str | None] = None  # out-of-tree extension to import first, if any

    @classmethod
    def module(cls) -> ModuleType | None:
        if cls.vendor_package is not None:
            if importlib.util.find_spec(cls.vendor_package) is None:
                return None
            try:
                importlib.import_module(cls.vendor_package)  # registers torch.<name>
            except Exception:  # a broken vendor install must not break CPU serving
                return None
        return getattr(torch, cls.name, None)

    @classmethod
    def is_available(cls) -> bool:
        mod = cls.module()
        try:
            return bool(mod is not None and mod.is_available())
        except Exception:  # drivers missing or mismatched report through exceptions on some stacks
            return False

    @classmethod
    def unavailable_reason(cls) -> str:
        if cls.vendor_package is not None and importlib.util.find_spec(cls.vendor_package) is None:
            return f"the {cls.vendor_package} package is not installed"
        return super().unavailable_reason()

    @classmethod
    def device_count(cls) -> int:
        mod = cls.module()
        return int(mod.device_count()) if mod is not None and cls.is_available() else 0

    def _mod(self) -> ModuleType:
        mod = self.module()
        if mod is None:
            raise RuntimeError(f"torch.{self.name} is not available")
        return mod

    def memory_info(self) -> tuple[int, int]:
        mod = self._mod()
        if hasattr(mod, "mem_get_info"):
            free, total = mod.mem_get_info(self.index)
            return int(free), int(total)
        total = int(mod.get_device_properties(self.index).total_memory)
        return total - int(mod.memory_reserved(self.index)), total

    def synchronize(self) -> None:
        self._mod().synchronize(self.torch_device)


class CudaPlatform(TorchModulePlatform):
    name = "cuda"
    dist_backend = "nccl"  # RCCL on ROCm builds, under the same name
    supports_graph_capture = True

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return bool(torch.cuda.is_bf16_supported())
        return super().supports_dtype(dtype)


class NpuPlatform(TorchModulePlatform):
    name = "npu"
    dist_backend = "hccl"
    vendor_package = "torch_npu"


class XpuPlatform(TorchModulePlatform):
    name = "xpu"
    dist_backend = "xccl"


class MluPlatform(TorchModulePlatform):
    name = "mlu"
    dist_backend = "cncl"
    vendor_package = "torch_mlu"


class MusaPlatform(TorchModulePlatform):
    name = "musa"
    dist_backend = "mccl"
    vendor_package = "torch_musa"


class MpsPlatform(TorchModulePlatform):
    """Apple GPUs share the system's memory; Metal reports a recommended working-set size instead of free."""

    name = "mps"
    dist_backend = "gloo"  # no collective library for Metal
    numbered = False

    @classmethod
    def is_available(cls) -> bool:
        return bool(torch.backends.mps.is_available())

    def memory_info(self) -> tuple[int, int]:
        total = int(torch.mps.recommended_max_memory())
        return max(total - int(torch.mps.driver_allocated_memory()), 0), total

    def synchronize(self) -> None:
        torch.mps.synchronize()

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:  # Metal has bf16 from macOS 14
            return bool(torch.backends.mps.is_macos_or_newer(14, 0))
        return super().supports_dtype(dtype)
