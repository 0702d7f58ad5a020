"""The fit check of an edge model package against a class of device (a chip id of the catalog), in the command
line layer because the service may not import the chip catalog: `cumulo edge deploy --device-class` calls
`check_package`, and `cumulo serve` installs `fit_check` as `app.state.edge_fit_check`, which
`POST /v1/edge/rollouts` runs for every device class the rollout targets."""

from __future__ import annotations

import hashlib
import tempfile
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cumulo.contracts.edge import DesiredModel
from cumulo.errors import InvalidRequest

MAX_PACKAGE_BYTES = 512 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30.0


def check_package(path: Path, sha256: str, device_class: str, format: str | None = None) -> None:
    """The package at `path` (its sha256 checked) against the device class's memory, formats and operators;
    `format` overrides the one the package names. Raises a one-line InvalidRequest (DoesNotFit)."""
    from cumulo.chips.catalog import get_chip
    from cumulo.edge.footprint import check_package_fits

    get_chip(device_class)  # an unknown class is said before anything is read
    if not path.is_file():
        raise InvalidRequest(f"no model file at {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise InvalidRequest(f"{path.name} has sha256 {digest[:12]}..., not the one given ({sha256[:12]}...)")
    check_package_fits(path, device_class, format)


def fit_check(model: DesiredModel, device_class: str) -> None:
    """`app.state.edge_fit_check`: the package at the rollout's URL (a file:// path is read in place, http(s)
    is downloaded, at most MAX_PACKAGE_BYTES) against `device_class`."""
    url = urlsplit(model.url)
    if url.scheme == "file":
        check_package(Path(unquote(url.path)), model.sha256, device_class)
        return
    if url.scheme not in ("http", "https"):
        raise InvalidRequest(f"cannot fetch {model.url[:80]!r} to check it fits {device_class}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "package.safetensors"
        try:
            with urllib.request.urlopen(model.url, timeout=DOWNLOAD_TIMEOUT_S) as answer:  # noqa: S310
                data = answer.read(MAX_PACKAGE_BYTES + 1)
        except OSError as error:
            raise InvalidRequest(
                f"cannot fetch {model.url[:80]} to check it fits {device_class}: {error}"
            ) from None
        if len(data) > MAX_PACKAGE_BYTES:
            raise InvalidRequest(f"{model.url[:80]} is over {MAX_PACKAGE_BYTES} bytes")
        path.write_bytes(data)
        check_package(path, model.sha256, device_class)


def install(app: Any) -> None:
    """Give the gateway the fit check (`cumulo serve`; the cluster gateway too)."""
    app.state.edge_fit_check = fit_check
