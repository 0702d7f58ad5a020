"""What the console's operator pages show that the service may not import itself (service/console/ops.py): the
chip catalog with the performance model's predictions, and the machines serving. `cumulo serve` installs them on
the app with `install`; `cumulo serve --cluster` passes the pool's nodes instead of this machine."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import cache
from typing import Any

from cumulo.errors import CumuloError, InvalidRequest
from cumulo.service.console.ops import ChipQuery


def install(app: Any, nodes: Callable[[], list[dict[str, Any]]] | None = None) -> None:
    app.state.ops_chips = chips_report
    app.state.ops_nodes = nodes or this_machine


def chips_report(query: ChipQuery) -> dict[str, Any]:
    """Every catalog chip (its figures at the top level, without their provenance) with the prediction for
    `query`, or the reason there is none (a chip with no published rate for the format)."""
    from cumulo.chips.catalog import load_catalog
    from cumulo.chips.predict import predict
    from cumulo.chips.presets import PRESETS
    from cumulo.chips.weight_formats import FORMATS, get_format

    if query.model not in PRESETS:  # a path would make the model read a config file the admin named
        raise InvalidRequest(f"unknown model {query.model!r}; known: {', '.join(PRESETS)}")
    get_format(query.format)
    data = []
    for chip in load_catalog().chips.values():
        row = chip.to_dict()
        del row["figures"]
        try:
            found = predict(query.model, query.format, chip, query.batch, query.context).to_dict()
            row["prediction"], row["error"] = _finite(found), None
        except CumuloError as exc:
            row["prediction"], row["error"] = None, str(exc)
        data.append(row)
    return {"data": data, "models": list(PRESETS), "formats": list(FORMATS)}


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: a figure the model cannot bound (no power figure, no throughput) becomes null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


@cache
def this_machine() -> list[dict[str, Any]]:
    """This machine as the one node of a gateway without a pool, in `cumulo nodes --json`'s shape."""
    from cumulo.cluster.nodes import default_node_name, local_devices

    devices = local_devices()
    main = devices[0]
    return [{
        "name": default_node_name(), "alive": True, "kind": main.kind, "device": main.name, "chip": main.chip,
        "devices": sum(1 for d in devices if d.kind == main.kind), "cpus": os.cpu_count() or 0,
        "memory_gb": main.memory_gb, "replicas": [],
    }]  # fmt: skip
