"""Export-control metrics: TPP, performance density, and the ECCN 3A090 reading under the 2022 and 2023 rules.

Engineering estimate, not legal advice. TPP = 2 x MacTOPS x bit length = dense TOPS x bit length, taking the
format that gives the largest product; performance density (PD) = TPP / die area in mm^2.

- 7 Oct 2022 (87 FR 62186): 3A090 = TPP >= 4800 AND aggregate bidirectional chip-to-chip I/O >= 600 GB/s.
- 17 Oct 2023 (88 FR 73458): the I/O test is gone. 3A090.a = TPP >= 4800, or TPP >= 1600 and PD >= 5.92.
  3A090.b (datacenter parts only) = TPP >= 2400 with 1.6 <= PD < 5.92, or TPP >= 1600 with 3.2 <= PD < 5.92.
  Our reading, as relayed for consumer GPUs: a part not designed or marketed for datacenters is caught only by
  TPP >= 4800.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cumulo.chips.catalog import THROUGHPUT_BITS, Chip

DISCLAIMER = "Engineering estimate, not legal advice: check the current Export Administration Regulations."
RULE_2022 = "2022-10-07 (87 FR 62186): 3A090 if TPP >= 4800 and chip-to-chip I/O >= 600 GB/s"
RULE_2023 = (
    "2023-10-17 (88 FR 73458): 3A090.a if TPP >= 4800, or TPP >= 1600 and PD >= 5.92; 3A090.b grey zone"
)


@dataclass(frozen=True, slots=True)
class ExportClass:
    chip: str
    tpp: float | None  # per chip (a rack entry is divided by its units)
    tpp_format: str | None
    performance_density: float | None
    rule_2022: str
    rule_2023: str
    disclaimer: str = DISCLAIMER

    def to_dict(self) -> dict:
        return asdict(self)


def tpp(chip: Chip) -> tuple[float | None, str | None]:
    """(TPP per chip, the throughput key that sets it); None where no throughput is published."""
    best: tuple[float | None, str | None] = (None, None)
    for key, bits in THROUGHPUT_BITS.items():
        value = chip.get(key)
        if value is None:
            continue
        score = value / chip.units * bits
        if best[0] is None or score >= best[0]:  # ties go to the narrower format, the one sold on
            best = (score, key)
    return best


def performance_density(chip: Chip) -> float | None:
    score, _ = tpp(chip)
    area = chip.get("die_area_mm2")
    return None if score is None or not area else score / area


def classify_2022(chip: Chip) -> str:
    score, _ = tpp(chip)
    if score is None:
        return "undetermined (no throughput published)"
    if score < 4800:
        return "not 3A090 (TPP < 4800)"
    io = chip.get("interconnect_gbs")
    if io is None:
        return "3A090 if chip-to-chip I/O >= 600 GB/s (I/O not published)"
    return "3A090" if io >= 600 else f"not 3A090 (I/O {io:g} GB/s < 600)"


def classify_2023(chip: Chip) -> str:
    score, _ = tpp(chip)
    if score is None:
        return "undetermined (no throughput published)"
    if score >= 4800:
        return "3A090.a (TPP >= 4800)"
    if not chip.datacenter:
        return "not 3A090 (non-datacenter part, TPP < 4800)"
    if score < 1600:
        return "not 3A090 (TPP < 1600)"
    pd = performance_density(chip)
    if pd is None:
        return "undetermined (die area unknown; TPP >= 1600)"
    if pd >= 5.92:
        return "3A090.a (TPP >= 1600 and PD >= 5.92)"
    if (score >= 2400 and pd >= 1.6) or pd >= 3.2:
        return "3A090.b (datacenter grey zone)"
    return "not 3A090 (PD too low)"


def classify(chip: Chip) -> ExportClass:
    score, key = tpp(chip)
    return ExportClass(
        chip.id, score, key, performance_density(chip), classify_2022(chip), classify_2023(chip)
    )
