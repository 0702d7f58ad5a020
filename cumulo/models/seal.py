"""The model seal: one sha256 over everything that decides a model's outputs (weights, config, tokenizer).

A single file (a GGUF holds all three) seals as the sha256 of its bytes, so a catalog model's seal is the
catalog's checksum. A directory seals over its model files in sorted order, each framed by its name and size,
so renaming or moving bytes between files changes the seal. Files are streamed in 1 MiB chunks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHUNK = 1 << 20

# (path, size, mtime_ns) -> seal; a process loading the same file twice hashes it once.
_memo: dict[tuple[str, int, int], str] = {}


def _update_from_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)


def file_seal(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        digest = hashlib.sha256()
        _update_from_file(digest, path)
        _memo[key] = "sha256:" + digest.hexdigest()
    return _memo[key]


def files_seal(root: Path, files: list[Path]) -> str:
    """Seal of a directory's model files; `files` are paths under `root`."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        _update_from_file(digest, path)
    return "sha256:" + digest.hexdigest()


def short(seal: str, length: int = 12) -> str:
    """`sha256:abcdef...` -> `abcdef123456`, for tables and logs."""
    return seal.split(":", 1)[-1][:length]
