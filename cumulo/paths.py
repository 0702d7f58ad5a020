"""Where Cumulo keeps its data: models, the embedded database, keys, calibration results.

Order: an explicit `--data-dir`, then `CUMULO_DATA_DIR`, then the per-user default
(`$XDG_DATA_HOME/cumulo`, i.e. `~/.local/share/cumulo`).
"""

from __future__ import annotations

import os
from pathlib import Path

_override: Path | None = None


def set_data_dir(path: str | os.PathLike[str] | None) -> None:
    """Called once by the CLI for `--data-dir`; library users may call it too."""
    global _override
    _override = Path(path).expanduser().resolve() if path else None


def data_dir() -> Path:
    if _override is not None:
        base = _override
    elif os.environ.get("CUMULO_DATA_DIR"):
        base = Path(os.environ["CUMULO_DATA_DIR"]).expanduser().resolve()
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        base = Path(xdg) / "cumulo"
    base.mkdir(parents=True, exist_ok=True)
    return base


def models_dir() -> Path:
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
