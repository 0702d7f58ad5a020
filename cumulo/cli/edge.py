"""`cumulo edge ...`: the edge fleet from the command line, on the service database (found as `cumulo admin`
finds it). enroll prints a device's one-time token; devices, deploy, rollouts and results mirror the
/v1/edge API. A running gateway publishes the desired states that `deploy` writes on its next pass.
`cumulo edge agent` (the device side) lives in `cumulo.cli.edge_agent`, `simulate` and `model` in
`cumulo.cli.edge_simulate`; their heavy imports wait until they run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from typing import Any

from cumulo.cli import edge_agent, edge_simulate
from cumulo.cli.database import service_sessions
from cumulo.errors import NotFound


def register(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="edge devices: enrol, list, deploy models, rollouts, results")
    verbs = edge.add_subparsers(dest="edge_verb", metavar="VERB", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--org", required=True, help="the organisation that owns the devices")
    common.add_argument(
        "--database-url", default=argparse.SUPPRESS, help="SQLAlchemy URL of the service database"
    )
    common.add_argument("--json", action="store_true", help="print JSON")

    enroll = verbs.add_parser("enroll", parents=[common], help="add a device and print its one-time token")
    enroll.add_argument("--device-id", default=None, help="the device's id (default: a random dev-...)")
    enroll.add_argument("--name", default="", help="a name for people (shelf 7, line 2)")
    enroll.add_argument("--server", default="http://127.0.0.1:8000", help="the URL the agent line names")
    enroll.set_defaults(func=cmd_enroll)

    listing = verbs.add_parser("devices", parents=[common], help="list devices, their state and last contact")
    listing.set_defaults(func=cmd_devices)

    revoke = verbs.add_parser("revoke", parents=[common], help="revoke a device's credential")
    revoke.add_argument("device_id", metavar="DEVICE")
    revoke.set_defaults(func=cmd_revoke)

    deploy = verbs.add_parser("deploy", parents=[common], help="roll a model out to the devices in stages")
    deploy.add_argument("--name", required=True, help="model name")
    deploy.add_argument("--version", required=True, help="model version")
    deploy.add_argument("--sha256", required=True, help="sha256 of the model file (the device checks it)")
    deploy.add_argument("--url", required=True, help="where devices fetch it")
    deploy.add_argument("--canary", type=float, default=0.1, help="share of devices that get it first")
    deploy.add_argument("--window", type=float, default=300.0, help="seconds the canaries must stay healthy")
    deploy.add_argument("--silence", type=float, default=120.0, help="a canary silent this long has failed")
    deploy.add_argument(
        "--device-class",
        default=None,
        help="chip id of the devices (imx500, rpi5, ...): refuse a model they cannot hold or run, before any rollout",
    )
    deploy.add_argument(
        "--model-file",
        default=None,
        help="a local copy of the model for the fit check (default: a file:// --url)",
    )
    deploy.add_argument(
        "--format", default=None, help="the format the devices run it in (default: the package's)"
    )
    deploy.set_defaults(func=cmd_deploy)

    history = verbs.add_parser("rollouts", parents=[common], help="every rollout, newest first, with history")
    history.set_defaults(func=cmd_rollouts)

    found = verbs.add_parser("results", parents=[common], help="stored results, oldest first (JSON lines)")
    found.add_argument("--device", default=None)
    found.add_argument("--kind", default=None)
    found.add_argument("--since", type=float, default=None, help="Unix seconds, inclusive (device time)")
    found.add_argument("--until", type=float, default=None, help="Unix seconds, exclusive")
    found.add_argument("--limit", type=int, default=100)
    found.set_defaults(func=cmd_results)

    agent = verbs.add_parser(
        "agent",
        help="run the device agent on this machine",
        description=(edge_agent.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    edge_agent.add_arguments(agent)  # the agent's own heavy imports wait until it runs
    agent.set_defaults(func=edge_agent.run)

    simulate = verbs.add_parser(
        "simulate",
        help="run a simulated fleet of shelf cameras on this machine",
        description=(edge_simulate.__doc__ or "").split("\n\n")[0],
    )
    edge_simulate.add_simulate_arguments(simulate)
    simulate.set_defaults(func=edge_simulate.run_simulate)

    model = verbs.add_parser("model", help="train the shelf model with a seed and write a package to deploy")
    edge_simulate.add_model_arguments(model)
    model.set_defaults(func=edge_simulate.run_model)


def _org_id(session: Any, name: str) -> int:
    from sqlalchemy import select

    from cumulo.service.db import Organization

    org_id = session.scalar(select(Organization.id).where(Organization.name == name))
    if org_id is None:
        raise NotFound(f"no organisation named {name!r}")
    return org_id


def _hasher() -> Any:
    from cumulo.service.security import KeyHasher, load_or_create_secret
    from cumulo.service.settings import Settings

    return KeyHasher(load_or_create_secret(Settings.from_env().data_dir))


def cmd_enroll(args: argparse.Namespace) -> int:
    from cumulo.service.edge import devices
    from cumulo.service.settings import Settings

    ttl = Settings.from_env().edge_enroll_ttl_seconds
    with service_sessions(args) as sessions, sessions() as session, session.begin():
        device, token = devices.create(
            session, _hasher(), _org_id(session, args.org), args.device_id, args.name, time.time(), ttl
        )
        device_id = device.device_id
    if args.json:
        print(json.dumps({"device_id": device_id, "enrollment_token": token, "expires_in": ttl}))
        return 0
    print(f"Device {device_id} added to {args.org}. Its one-time enrolment token (valid {ttl / 3600:.0f} h):")
    print(token)
    _print_qr(token)
    print(f"On the device: cumulo edge agent --server {args.server} --token {token}")
    return 0


def _print_qr(text: str) -> None:
    """The token as a QR code in the terminal when `segno` is installed (optional); text alone otherwise."""
    try:
        segno = importlib.import_module("segno")
    except ImportError:
        return
    segno.make(text, error="m").terminal(compact=True)


def cmd_devices(args: argparse.Namespace) -> int:
    from cumulo.service.edge import devices

    now = time.time()
    with service_sessions(args) as sessions, sessions() as session:
        rows = [devices.view(d, now, 120.0) for d in devices.list_for(session, _org_id(session, args.org))]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'DEVICE':<24} {'STATE':<9} {'ONLINE':<7} {'LAST SEEN':<10} {'RUNS':<12} {'WANTS':<12} REFUSED")
    for row in rows:
        seen = f"{now - row['last_seen']:.0f} s ago" if row["last_seen"] else "never"
        runs = ((row["reported"] or {}).get("model") or {}).get("version", "-")
        wants = (row["desired"]["model"] or {}).get("version", "-")
        refused = ", ".join(f"{reason} {n}" for reason, n in sorted(row["refused"].items())) or "-"
        print(
            f"{row['device_id']:<24} {row['state']:<9} {str(row['online']).lower():<7} {seen:<10} {runs:<12} "
            f"{wants:<12} {refused}"
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from cumulo.service.edge import devices

    with service_sessions(args) as sessions, sessions() as session, session.begin():
        devices.revoke(devices.get(session, _org_id(session, args.org), args.device_id), time.time())
    print(f"Revoked device {args.device_id}.")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cumulo.contracts.edge import DesiredModel
    from cumulo.errors import InvalidRequest
    from cumulo.service.edge import rollouts

    try:
        model = DesiredModel(name=args.name, version=args.version, sha256=args.sha256.lower(), url=args.url)
    except ValidationError as error:
        first = error.errors()[0]
        raise InvalidRequest(f"--{first['loc'][0]}: {first['msg']}") from None
    if args.device_class is not None:
        _check_device_class(args, model.sha256)
    with service_sessions(args) as sessions, sessions() as session, session.begin():
        rollout = rollouts.start(
            session,
            _org_id(session, args.org),
            model,
            time.time(),
            canary_share=args.canary,
            window_seconds=args.window,
            silence_seconds=args.silence,
        )
        view = rollouts.view(session, rollout)
    if args.json:
        print(json.dumps(view))
    else:
        print(
            f"Rollout {view['id']}: {args.name} {args.version} to canaries {', '.join(view['canaries'])}; "
            f"the other {len(view['rest'])} follow after {args.window:.0f} s if the canaries stay healthy."
        )
    return 0


def _check_device_class(args: argparse.Namespace, sha256: str) -> None:
    """The fit check of `deploy --device-class` (`cumulo.cli.edge_fit`): the package the devices would download
    against the target's memory, formats and operators. A one-line InvalidRequest before anything is written."""
    from pathlib import Path
    from urllib.parse import unquote, urlsplit

    from cumulo.cli.edge_fit import check_package
    from cumulo.errors import InvalidRequest

    local = args.model_file
    if local is None and urlsplit(args.url).scheme == "file":
        local = unquote(urlsplit(args.url).path)
    if local is None:
        raise InvalidRequest(
            "--device-class needs the model to check: give --model-file PATH or a file:// --url"
        )
    check_package(Path(local), sha256, args.device_class, args.format)


def cmd_rollouts(args: argparse.Namespace) -> int:
    from cumulo.service.edge import rollouts

    with service_sessions(args) as sessions, sessions() as session:
        rows = [rollouts.view(session, r) for r in rollouts.list_for(session, _org_id(session, args.org))]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        model = row["model"]
        print(
            f"{row['id']:>4}  {model['name']} {model['version']:<10} {row['state']:<12} {row['reason'] or ''}"
        )
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from cumulo.service.edge import devices, results

    with service_sessions(args) as sessions, sessions() as session:
        org_id = _org_id(session, args.org)
        device = devices.get(session, org_id, args.device).id if args.device else None
        rows = results.query(
            session,
            org_id,
            device=device,
            kind=args.kind,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
        for row, device_id in rows:
            print(json.dumps(results.view(row, device_id)))
    return 0
