"""Platforms: device strings, auto choice, memory and dtype hints, CPU threads, KV cache budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cumulo.platform.cpu as cpu_module
import cumulo.platform.threads as threads_module
from cumulo.errors import InvalidRequest
from cumulo.platform import (
    ACCELERATORS,
    CpuPlatform,
    CudaPlatform,
    NpuPlatform,
    Platform,
    XpuPlatform,
    configure_cpu_threads,
    default_cpu_threads,
    get_platform,
    kv_cache_budget_bytes,
)
from cumulo.platform.cpu import cgroup_memory, read_meminfo
from cumulo.platform.threads import cgroup_cpu_quota, physical_cores

GIB = 1 << 30


@pytest.fixture
def no_accelerators(monkeypatch):
    for kind in ACCELERATORS:
        monkeypatch.setattr(kind, "is_available", classmethod(lambda cls: False))


def fake_available(monkeypatch, kind: type[Platform], count: int = 1) -> None:
    monkeypatch.setattr(kind, "is_available", classmethod(lambda cls: True))
    monkeypatch.setattr(kind, "device_count", classmethod(lambda cls: count))


def test_cpu_platform_describes_the_cpu():
    p = get_platform("cpu")
    assert isinstance(p, CpuPlatform)
    assert (p.device, p.torch_device, p.dist_backend, p.is_accelerator) == (
        "cpu",
        torch.device("cpu"),
        "gloo",
        False,
    )
    free, total = p.memory_info()
    assert 0 < free <= total
    p.synchronize()  # a no-op, but it must exist


def test_device_strings_are_case_and_space_tolerant_and_cpu_0_is_cpu():
    assert get_platform(" CPU ").device == "cpu"
    assert get_platform("cpu:0").device == "cpu"


def test_auto_falls_back_to_cpu_without_accelerators(no_accelerators):
    assert isinstance(get_platform("auto"), CpuPlatform)
    assert isinstance(get_platform(), CpuPlatform)


def test_auto_takes_the_first_available_accelerator_in_order(no_accelerators, monkeypatch):
    fake_available(monkeypatch, XpuPlatform)
    fake_available(monkeypatch, NpuPlatform)
    p = get_platform("auto")
    assert isinstance(p, NpuPlatform) and p.device == "npu:0" and p.dist_backend == "hccl"
    fake_available(monkeypatch, CudaPlatform)
    assert get_platform("auto").device == "cuda:0"


def test_explicit_index_is_kept_and_checked_against_the_device_count(no_accelerators, monkeypatch):
    fake_available(monkeypatch, CudaPlatform, count=2)
    assert get_platform("cuda:1").device == "cuda:1"
    assert get_platform("cuda").device == "cuda:0"
    with pytest.raises(InvalidRequest, match="has 2 cuda device"):
        get_platform("cuda:2")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "cuda:-1", "cuda:0:1", "tpu:0"])
def test_unknown_device_strings_are_one_clear_error(device):
    with pytest.raises(InvalidRequest, match="unknown device") as info:
        get_platform(device)
    message = str(info.value)
    assert "\n" not in message and "cpu" in message and "cuda[:N]" in message


def test_cpu_has_no_numbered_devices():
    with pytest.raises(InvalidRequest, match="no numbered devices"):
        get_platform("cpu:1")


def test_an_unavailable_accelerator_is_an_error_not_a_silent_fallback(no_accelerators):
    with pytest.raises(InvalidRequest, match="'xpu:0' is not available"):
        get_platform("xpu:0")


def test_a_missing_vendor_package_is_named(no_accelerators, monkeypatch):
    monkeypatch.setattr(NpuPlatform, "vendor_package", "cumulo_no_such_package")
    with pytest.raises(InvalidRequest, match="cumulo_no_such_package package is not installed"):
        get_platform("npu")


def test_meminfo_reports_available_and_total_bytes(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24000 kB\nMemFree:  1000 kB\nMemAvailable:   16000 kB\nCached: 5 kB\n")
    assert read_meminfo(f) == (16000 * 1024, 24000 * 1024)
    assert read_meminfo(tmp_path / "missing") is None


def test_cgroup_memory_limit_v2_v1_and_unlimited(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert cgroup_memory(tmp_path) == (768 << 20, 1 << 30)
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory(tmp_path) is None

    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2 << 30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(1 << 30))
    assert cgroup_memory(v1) == (1 << 30, 2 << 30)
    assert cgroup_memory(tmp_path / "nothing") is None


def test_cpu_memory_is_capped_by_the_cgroup(monkeypatch):
    monkeypatch.setattr(cpu_module, "read_meminfo", lambda: (16 * GIB, 24 * GIB))
    monkeypatch.setattr(cpu_module, "cgroup_memory", lambda: (3 * GIB, 8 * GIB))
    assert CpuPlatform().memory_info() == (3 * GIB, 8 * GIB)
    monkeypatch.setattr(cpu_module, "cgroup_memory", lambda: None)
    assert CpuPlatform().memory_info() == (16 * GIB, 24 * GIB)


def test_cpu_without_native_bf16_prefers_float32(monkeypatch):
    monkeypatch.setattr(cpu_module, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    p = CpuPlatform()
    assert not p.supports_dtype(torch.bfloat16) and not p.supports_dtype(torch.float16)
    assert p.pick_dtype(torch.bfloat16) == torch.float32
    assert p.pick_dtype(torch.float32) == torch.float32
    monkeypatch.setattr(cpu_module, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert p.pick_dtype(torch.bfloat16) == torch.bfloat16


def test_accelerators_offer_no_fused_decode_attention_yet():
    # Only the CPU ships a fused paged-attention kernel; accelerators use the portable PyTorch path until theirs land.
    assert all(
        kind.paged_decode_attention(kind.__new__(kind), torch.float32, 64) is None for kind in ACCELERATORS
    )


def write_topology(root: Path, cpu: int, package: int, core: int) -> None:
    topology = root / f"cpu{cpu}" / "topology"
    topology.mkdir(parents=True)
    (topology / "physical_package_id").write_text(f"{package}\n")
    (topology / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_hyperthread_siblings_once(tmp_path):
    # Two packages, two cores each, two threads per core: cpus 0-7.
    for cpu in range(8):
        write_topology(tmp_path, cpu, package=cpu // 4, core=(cpu // 2) % 2)
    assert physical_cores(set(range(8)), tmp_path) == 4
    assert physical_cores({0, 1}, tmp_path) == 1
    assert physical_cores({0, 2, 4}, tmp_path) == 3
    assert physical_cores({0, 9}, tmp_path) == 2  # cpu9 has no topology: count logical cpus


def test_cgroup_cpu_quota_v2_v1_and_unlimited(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_quota(v1) is None


def test_default_threads_are_physical_cores_capped_by_the_quota(tmp_path, monkeypatch):
    sysfs, cgroup = tmp_path / "sys", tmp_path / "cgroup"
    cgroup.mkdir()
    for cpu in range(8):
        write_topology(sysfs, cpu, package=0, core=cpu // 2)
    monkeypatch.setattr(threads_module, "allowed_cpus", lambda: set(range(8)))
    assert default_cpu_threads(sysfs, cgroup) == 4
    (cgroup / "cpu.max").write_text("250000 100000\n")
    assert default_cpu_threads(sysfs, cgroup) == 3  # 2.5 CPUs of quota: round up
    (cgroup / "cpu.max").write_text("10000 100000\n")
    assert default_cpu_threads(sysfs, cgroup) == 1


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_cpu_threads_sets_torch_threads(restore_threads, monkeypatch):
    assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(threads_module, "default_cpu_threads", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert configure_cpu_threads(None) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configure_cpu_threads(None) == 1 and torch.get_num_threads() == 1
    configure_cpu_threads(2)  # a second call must not trip over the once-only inter-op setting


def test_configure_cpu_threads_rejects_zero(restore_threads):
    with pytest.raises(InvalidRequest):
        configure_cpu_threads(0)


class FakeCpu(CpuPlatform):
    def __init__(self, free: int, total: int) -> None:
        super().__init__()
        self.free, self.total = free, total

    def memory_info(self) -> tuple[int, int]:
        return self.free, self.total


class FakeAccelerator(Platform):
    name = "fake"
    dist_backend = "none"

    def memory_info(self) -> tuple[int, int]:
        return 60 * GIB, 80 * GIB


def test_cpu_budget_defaults_to_a_quarter_of_free_memory_up_to_4_gib():
    assert kv_cache_budget_bytes(FakeCpu(8 * GIB, 16 * GIB)) == 2 * GIB
    assert kv_cache_budget_bytes(FakeCpu(64 * GIB, 128 * GIB)) == 4 * GIB


def test_explicit_gib_wins_on_any_platform():
    assert kv_cache_budget_bytes(FakeCpu(8 * GIB, 16 * GIB), gib=1.5) == 3 * GIB // 2
    assert kv_cache_budget_bytes(FakeAccelerator(), gib=10) == 10 * GIB


def test_accelerator_budget_is_a_fraction_of_free_memory():
    assert kv_cache_budget_bytes(FakeAccelerator()) == int(60 * GIB * 0.8)
    assert kv_cache_budget_bytes(FakeAccelerator(), fraction=0.5) == 30 * GIB
    assert kv_cache_budget_bytes(FakeCpu(8 * GIB, 16 * GIB), fraction=0.5) == 4 * GIB


@pytest.mark.parametrize(
    "kwargs", [{"gib": 0}, {"gib": -1.0}, {"fraction": 0.0}, {"fraction": 1.5}, {"gib": 1.0, "fraction": 0.5}]
)
def test_bad_budgets_are_rejected(kwargs):
    with pytest.raises(InvalidRequest):
        kv_cache_budget_bytes(FakeAccelerator(), **kwargs)
