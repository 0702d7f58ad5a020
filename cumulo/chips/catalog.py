"""The chip catalog: frozen records read from `catalog.toml` plus the calibrated `local` chip, if any.

Every number carries its source and provenance, so a table can say how far to trust it. The `local` chip is
written by `cumulo chips calibrate` as JSON in the data directory and merged in at load time.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from cumulo.errors import ChipNotFound, CumuloError

PROVENANCES = ("vendor-published", "derived", "reported", "measured")

# Throughput keys and the bit length of the operation each one counts (for TPP, see export.py).
THROUGHPUT_BITS: Mapping[str, int] = MappingProxyType(
    {
        "fp32_tflops": 32,
        "tf32_tflops": 32,
        "bf16_tflops": 16,
        "fp8_tflops": 8,
        "int8_tops": 8,
        "fp4_tflops": 4,
    }
)
FIGURE_KEYS = (
    *THROUGHPUT_BITS,
    "memory_gb",
    "memory_bandwidth_gbs",
    "interconnect_gbs",
    "power_w",
    "price_usd",
    "die_area_mm2",
    "op_latency_us",
    "graph_op_latency_us",  # per op when a decode step replays a recorded graph (CUDA graphs, Cumulo's CPU graph)
    # Serving-scale figures (expert parallelism, predict.py / expert_parallel.py):
    "compute_utilization",  # share of peak FLOPs that the chip's attention/matmul kernels were measured to reach
    "bandwidth_utilization",  # share of peak memory bandwidth the same kernels reached
    "gemm_utilization",  # share of peak FLOPs its GEMM kernels reach at prefill shapes (thousands of rows)
    "scaleup_chips",  # chips one interconnect_gbs domain joins (an NVLink node: 8; a CloudMatrix supernode: 384)
    "scaleout_gbs",  # aggregate bidirectional bandwidth per chip to chips outside that domain (InfiniBand, RoCE)
    "alltoall_gbs",  # measured low-latency MoE dispatch/combine bytes/s per chip, one way, one copy per expert
    # measured high-throughput (prefill) dispatch/combine, logical bytes/s per chip one way as DeepEP counts them:
    "bulk_alltoall_scaleup_gbs",  # within the scale-up domain, a token counted once per destination chip
    "bulk_alltoall_scaleout_gbs",  # across it, a token counted once per destination node
    "bulk_alltoall_core_share",  # share of the chip's cores (SMs) those kernels held when measured
    # measured only (calibration): achieved TFLOP/s of a linear with M rows over big weights, the decode shape
    *(f"{dtype}_m{m}_tflops" for dtype in ("fp32", "bf16") for m in (1, 4, 8, 16, 64, 256, 512)),
)
# Rows of the measured linears: decode batches up to a prefill step (the engine's default budget is 512
# tokens); 16 is where the CPU's dense decode kernels hand over to torch's GEMM.
SKINNY_ROWS = (1, 4, 8, 16, 64, 256, 512)
# Measured only: the same curve for Cumulo's packed linear in a compact format ("mxfp4_m16_tflops"), which
# includes whatever dequantization or fused kernel the formats layer uses on this machine.
FORMAT_CURVE_KEY = re.compile(r"^[a-z0-9-]+_m(" + "|".join(str(m) for m in SKINNY_ROWS) + r")_tflops$")
KINDS = ("gpu", "npu", "rack", "cpu", "sensor")
LOCAL_ID = "local"


@dataclass(frozen=True, slots=True)
class Source:
    id: str
    title: str
    url: str
    date: str
    checked: bool


@dataclass(frozen=True, slots=True)
class Figure:
    value: float
    provenance: str
    source: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Chip:
    id: str
    name: str
    vendor: str
    year: int
    kind: str
    native: tuple[str, ...]
    figures: Mapping[str, Figure] = field(default_factory=dict)
    units: int = 1  # chips in one entry (a rack holds many)
    datacenter: bool = True
    achieved: bool = False  # figures are achieved rates (CPU entries, calibration), not vendor peaks

    def get(self, key: str) -> float | None:
        fig = self.figures.get(key)
        return None if fig is None else fig.value

    @property
    def power_w(self) -> float | None:
        return self.get("power_w")

    @property
    def memory_gb(self) -> float | None:
        return self.get("memory_gb")

    @property
    def memory_bandwidth_gbs(self) -> float | None:
        return self.get("memory_bandwidth_gbs")

    def to_dict(self) -> dict:
        """Plain JSON-ready form: top-level values for scripts, and every figure with its provenance."""
        out: dict = {
            "id": self.id,
            "name": self.name,
            "vendor": self.vendor,
            "year": self.year,
            "kind": self.kind,
            "units": self.units,
            "datacenter": self.datacenter,
            "achieved": self.achieved,
            "native_formats": list(self.native),
        }
        for key in FIGURE_KEYS:
            out[key] = self.get(key)
        out["figures"] = {
            k: {"value": f.value, "provenance": f.provenance, "source": f.source, "note": f.note}
            for k, f in self.figures.items()
        }
        return out


@dataclass(frozen=True, slots=True)
class Catalog:
    chips: Mapping[str, Chip]
    sources: Mapping[str, Source]

    def get(self, chip_id: str) -> Chip:
        chip = self.chips.get(chip_id.strip().lower())
        if chip is None:
            hint = " (run 'cumulo chips calibrate' first)" if chip_id == LOCAL_ID else ""
            raise ChipNotFound(f"unknown chip '{chip_id}'{hint}; known: {', '.join(self.ids())}")
        return chip

    def ids(self) -> list[str]:
        return list(self.chips)


def _figure(chip_id: str, key: str, raw: object, sources: Mapping[str, Source]) -> Figure:
    if not isinstance(raw, dict) or "value" not in raw:
        raise CumuloError(f"chip catalog: {chip_id}.{key} must be a table with value/provenance/source")
    fig = Figure(
        float(raw["value"]),
        str(raw.get("provenance", "")),
        str(raw.get("source", "")),
        str(raw.get("note", "")),
    )
    if fig.provenance not in PROVENANCES:
        raise CumuloError(f"chip catalog: {chip_id}.{key} has provenance '{fig.provenance}'")
    if fig.source not in sources:
        raise CumuloError(f"chip catalog: {chip_id}.{key} cites unknown source '{fig.source}'")
    return fig


def _chip(chip_id: str, raw: dict, sources: Mapping[str, Source]) -> Chip:
    curves = {k for k in raw if FORMAT_CURVE_KEY.match(k) and k not in FIGURE_KEYS}
    figures = {k: _figure(chip_id, k, raw[k], sources) for k in (*FIGURE_KEYS, *sorted(curves)) if k in raw}
    if any(figures[k].provenance != "measured" for k in curves):
        raise CumuloError(f"chip catalog: {chip_id}: per-format curves must be measured")
    unknown = (
        set(raw)
        - set(FIGURE_KEYS)
        - curves
        - {"name", "vendor", "year", "kind", "units", "datacenter", "achieved", "native"}
    )
    if unknown:
        raise CumuloError(f"chip catalog: {chip_id} has unknown keys {sorted(unknown)}")
    kind = str(raw.get("kind", "gpu"))
    if kind not in KINDS:
        raise CumuloError(f"chip catalog: {chip_id} has kind '{kind}'")
    return Chip(
        id=chip_id,
        name=str(raw["name"]),
        vendor=str(raw["vendor"]),
        year=int(raw["year"]),
        kind=kind,
        native=tuple(raw.get("native", ())),
        figures=MappingProxyType(figures),
        units=int(raw.get("units", 1)),
        datacenter=bool(raw.get("datacenter", True)),
        achieved=bool(raw.get("achieved", False)),
    )


def local_chip_path() -> Path:
    from cumulo.paths import data_dir

    return data_dir() / "chips" / "local.json"


def parse_catalog(data: dict, local: dict | None = None) -> Catalog:
    sources = {
        sid: Source(
            sid, str(s["title"]), str(s.get("url", "")), str(s.get("date", "")), bool(s.get("checked"))
        )
        for sid, s in data["sources"].items()
    }
    raw_chips: dict[str, dict] = dict(data["chips"])
    if local is not None:
        sources["local-calibration"] = Source(
            "local-calibration",
            "cumulo chips calibrate on this machine",
            str(local.get("path", "")),
            str(local.get("measured_at", "")),
            True,
        )
        raw_chips[LOCAL_ID] = {k: v for k, v in local.items() if k not in ("path", "measured_at")}
    chips = {cid: _chip(cid, raw, sources) for cid, raw in raw_chips.items()}
    return Catalog(MappingProxyType(chips), MappingProxyType(sources))


def load_catalog(include_local: bool = True) -> Catalog:
    """Read the shipped catalog, plus `local` from the data directory when calibration has run."""
    text = resources.files("cumulo.chips").joinpath("catalog.toml").read_text(encoding="utf-8")
    local = None
    if include_local:
        path = local_chip_path()
        if path.exists():
            try:
                local = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CumuloError(
                    f"cannot read calibration {path}: {exc}; run 'cumulo chips calibrate'"
                ) from exc
            local["path"] = str(path)
    return parse_catalog(tomllib.loads(text), local)


def get_chip(chip: str | Chip, catalog: Catalog | None = None) -> Chip:
    if isinstance(chip, Chip):
        return chip
    return (catalog or load_catalog()).get(chip)
