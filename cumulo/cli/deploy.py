"""`cumulo deploy`, `cumulo undeploy`, `cumulo deployments`: the models the pool serves, stored in the service
database (found as `cumulo admin` finds it: `--database-url`, `CUMULO_DATABASE_URL`, or the SQLite file in the
data directory). Gateways running the pool pick changes up from there; a restarted one restores them.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cumulo.cli.database import service_sessions
from cumulo.errors import InvalidRequest

if TYPE_CHECKING:
    from cumulo.service.deployments import DeploymentSpec


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="SQLAlchemy URL of the service database (default: as `cumulo serve`)",
    )
    deploy = sub.add_parser(
        "deploy",
        parents=[common],
        help="serve a model on the pool (or change how it is served)",
        description="Store a deployment: the pool starts its replicas and routes requests for its name to them. "
        "Deploying a name again replaces its whole deployment (options left out take their defaults).",
    )
    deploy.add_argument("model", metavar="MODEL", help="catalog name, .gguf file or model directory")
    deploy.add_argument(
        "--name",
        default=None,
        help="the model name clients call (default: MODEL, or the file/directory name)",
    )
    deploy.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 1)")
    deploy.add_argument(
        "--min-replicas", type=int, default=None, metavar="A", help="autoscale from A replicas (with --max)"
    )
    deploy.add_argument(
        "--max-replicas", type=int, default=None, metavar="B", help="autoscale up to B replicas (with --min)"
    )
    deploy.add_argument(
        "--format", default=None, help="number format to serve in, e.g. mxfp8 (default: as stored)"
    )
    deploy.add_argument("--chip", default=None, help="catalog chip id to place on (see `cumulo chips list`)")
    deploy.add_argument(
        "--ttft-slo-ms", type=float, default=None, metavar="X", help="time-to-first-token goal"
    )
    deploy.add_argument(
        "--tpot-slo-ms", type=float, default=None, metavar="Y", help="time-per-output-token goal"
    )
    deploy.set_defaults(func=cmd_deploy)

    undeploy = sub.add_parser(
        "undeploy",
        parents=[common],
        help="stop serving a deployed model",
        description="Remove a deployment; every gateway of the pool stops serving it.",
    )
    undeploy.add_argument("name", metavar="MODEL", help="the deployment's model name")
    undeploy.set_defaults(func=cmd_undeploy)

    listing = sub.add_parser(
        "deployments",
        parents=[common],
        help="list deployments and their replicas",
        description="List stored deployments and, when a pool is reachable, each replica's node and state.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument(
        "--explain", action="store_true", help="say why placement put each replica where it is"
    )
    listing.add_argument(
        "--address", default=None, help="the pool's head HOST:PORT (default: from the data directory)"
    )
    listing.set_defaults(func=cmd_deployments)


def check_spec(spec: DeploymentSpec) -> DeploymentSpec:
    """A `cumulo.service.deployments.SpecCheck`: refuses unknown chip ids and format names, returns canonical
    ones. The service cannot import the chips catalog or the formats, so serve hands it this function."""
    from dataclasses import replace

    if spec.chip is not None:
        from cumulo.chips.catalog import load_catalog

        spec = replace(spec, chip=load_catalog().get(spec.chip).id)
    if spec.format is not None and spec.format not in ("fp32", "bf16", "fp16"):  # dtypes: not packed schemes
        from cumulo.formats.schemes import get_scheme  # imports torch: only when a format is asked for

        spec = replace(spec, format=get_scheme(spec.format).name)
    return spec


def live_replicas(rows: list[dict[str, Any]], address: str | None = None) -> list[dict[str, Any]] | None:
    """The live replicas of the stored deployments `rows` (as `deployments.as_dict` gives them): one dict per
    replica with "model", "node" and "state" (and placement's chip, format and reason). None when no pool is
    reachable (none recorded in the data directory, or its head does not answer)."""
    from cumulo.cluster.ray_cluster import ClusterError, connect, find_address

    try:
        connect(find_address(address))
    except ClusterError:
        return None
    from cumulo.cluster.replica import replica_statuses

    models = {row["model"] for row in rows}
    return [r for r in replica_statuses() if r.get("model") in models]


def _source_and_name(model: str, name: str | None) -> tuple[str, str]:
    """(source to store, name clients call). An existing path is stored absolute, so that a gateway started in
    another directory finds it; it is named after its file or directory, as `cumulo serve` names it."""
    from cumulo.models.catalog import CATALOG
    from cumulo.paths import models_dir

    path = Path(model).expanduser()
    if model in CATALOG or ("/" not in model and (models_dir() / model).is_dir()):
        return model, name or model
    if path.exists():
        return str(path.resolve()), name or path.resolve().name
    known = ", ".join(sorted(CATALOG))
    raise InvalidRequest(f"MODEL {model!r} is neither a catalog name ({known}) nor an existing path")


def cmd_deploy(args: argparse.Namespace) -> int:
    from cumulo.service import deployments

    ranged = args.min_replicas is not None or args.max_replicas is not None
    if args.replicas is not None and ranged:
        raise InvalidRequest("--replicas excludes --min-replicas/--max-replicas: give a count or a range")
    if ranged and (args.min_replicas is None or args.max_replicas is None):
        raise InvalidRequest("--min-replicas and --max-replicas go together: give both")
    source, name = _source_and_name(args.model, args.name)
    wanted = check_spec(
        deployments.spec(
            name,
            source,
            replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            format=args.format,
            chip=args.chip,
            ttft_slo_ms=args.ttft_slo_ms,
            tpot_slo_ms=args.tpot_slo_ms,
        )
    )
    with service_sessions(args) as sessions, sessions() as session, session.begin():
        before = deployments.current_generation(session)
        row, created = deployments.create_or_update(session, wanted)
        changed = row.generation > before
    verb = "Deployed" if created else "Updated" if changed else "Unchanged:"
    print(f"{verb} {row.model} ({_describe(deployments.as_dict(row))}).")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    from cumulo.service import deployments

    with service_sessions(args) as sessions, sessions() as session, session.begin():
        deployments.delete(session, args.name)
    print(f"Undeployed {args.name}.")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from cumulo.service import deployments

    with service_sessions(args) as sessions, sessions() as session:
        rows = [deployments.as_dict(r) for r in deployments.list_deployments(session)]
    live = live_replicas(rows, getattr(args, "address", None))
    if args.json:
        for row in rows:
            row["replicas_status"] = [r for r in live or [] if r.get("model") == row["model"]]
        json.dump({"object": "list", "data": rows, "pool_reachable": live is not None}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("No deployments. Add one with `cumulo deploy MODEL`.")
        return 0
    _print_table(
        "Deployments",
        ["model", "source", "replicas", "format", "chip", "ttft slo ms", "tpot slo ms", "updated (UTC)"],
        [
            [
                r["model"],
                r["source"],
                _replicas(r),
                r["format"] or "-",
                r["chip"] or "-",
                _number(r["ttft_slo_ms"]),
                _number(r["tpot_slo_ms"]),
                datetime.fromtimestamp(r["updated_at"], UTC).strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for r in rows
        ],
    )
    if live is None:
        print("No pool reachable: showing stored deployments only.")
    else:
        keys = ["replica", "node", "state", "chip", "format", "running", "waiting", "served"]
        _print_table("Replicas", keys, [[str(r.get(k, "-")) for k in keys] for r in live])
        if getattr(args, "explain", False):
            for r in live:
                print(f"{r['replica']}: {r.get('reason') or r.get('error') or 'no reason recorded'}")
    return 0


def _replicas(row: dict[str, Any]) -> str:
    if row["min_replicas"] == row["max_replicas"]:
        return str(row["replicas"])
    return f"{row['min_replicas']}..{row['max_replicas']} (start {row['replicas']})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _describe(row: dict[str, Any]) -> str:
    parts = [row["source"], f"replicas {_replicas(row)}"]
    parts += [f"{k} {row[k]}" for k in ("format", "chip") if row[k] is not None]
    parts += [
        f"{k[:4].upper()} SLO {row[k]:g} ms" for k in ("ttft_slo_ms", "tpot_slo_ms") if row[k] is not None
    ]
    return ", ".join(parts)


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(150, Console().width)).print(table)
