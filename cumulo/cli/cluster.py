"""The pool's verbs: `cumulo join` (add this machine to a pool) and `cumulo nodes` (what the pool has), and the
gateway side of `cumulo serve --cluster` (`run_gateway`): a Ray head beside the gateway, a controller that keeps
the stored deployments' replicas, one pool per model."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
from typing import Any

from cumulo.errors import CumuloError


def register(sub: argparse._SubParsersAction) -> None:
    j = sub.add_parser(
        "join",
        help="add this machine (its CPU and accelerators) to a pool; stays in the foreground until Ctrl-C",
        description="Join the pool whose head is at ADDRESS (printed by 'cumulo serve --cluster'). The node "
        "describes its devices to the pool (chips matched to the catalog) and runs replicas that placement "
        "puts on it. Ctrl-C leaves the pool cleanly; its replicas are placed again elsewhere.",
    )
    j.add_argument("address", metavar="ADDRESS", help="the head's HOST:PORT")
    j.add_argument("--name", default=None, help="this node's name in the pool (default: the host name)")
    j.add_argument("--num-cpus", type=int, default=None, help="CPUs to offer (default: all)")
    j.add_argument("--memory", type=float, default=None, metavar="GiB", help="memory to offer (default: all)")
    j.add_argument(
        "--node-ip", default=None, metavar="ADDRESS", help="the address the pool reaches this machine at "
        "(default: the one that routes to the head; set it on a machine with several networks)",
    )  # fmt: skip
    j.set_defaults(func=cmd_join)

    n = sub.add_parser(
        "nodes",
        help="list the pool's nodes: devices, matched chips, health and the replicas on each",
        description="List the nodes of the pool found in the data directory (written by 'cumulo serve "
        "--cluster') or at --address.",
    )
    n.add_argument("--address", default=None, help="the head's HOST:PORT (default: from the data directory)")
    n.add_argument("--json", action="store_true", help="print JSON instead of a table")
    n.set_defaults(func=cmd_nodes)


def cmd_join(args: argparse.Namespace) -> int:
    from cumulo.cluster.ray_cluster import join_command

    if args.num_cpus is not None and args.num_cpus < 1:
        raise CumuloError(f"--num-cpus must be at least 1, not {args.num_cpus}")
    if args.memory is not None and args.memory <= 0:
        raise CumuloError(f"--memory must be positive, not {args.memory}")
    command = join_command(args.address, args.name, args.num_cpus, args.memory)
    if args.node_ip:
        command.append(f"--node-ip-address={args.node_ip}")
    print(f"Joining the pool at {args.address}; Ctrl-C to leave.", flush=True)
    # Ctrl-C and SIGTERM (a service manager's stop) both leave cleanly, also when started from a script's
    # background job, which starts with SIGINT ignored and so without Python's KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = process.communicate()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops this node's processes
        process.wait(60)
        print("Left the pool.")
        return 0
    if process.returncode not in (0, -signal.SIGTERM):
        last = next((ln for ln in reversed(err.decode(errors="replace").splitlines()) if ln.strip()), "")
        raise CumuloError(f"could not join the pool at {args.address}: {last or 'ray start failed'}")
    return 0


def pool_nodes(address: str | None) -> list[dict[str, Any]]:
    """Every node the pool knows, alive or dead, with its devices and the replicas on it."""
    import ray

    from cumulo.cluster.ray_cluster import connect, find_address
    from cumulo.cluster.replica import replica_statuses

    connect(find_address(address))
    replicas = replica_statuses()
    out = []
    for n in ray.nodes():
        labels = n.get("Labels") or {}
        res = n.get("Resources") or {}
        name = labels.get("cumulo-name") or n["NodeID"][:12]
        out.append({
            "name": name, "node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
            "alive": bool(n.get("Alive")), "kind": labels.get("cumulo-kind", "?"),
            "device": labels.get("cumulo-device", ""), "chip": labels.get("cumulo-chip", "?"),
            "devices": int(labels.get("cumulo-devices", "0") or 0), "cpus": res.get("CPU", 0),
            "memory_gb": float(labels.get("cumulo-memory-gb") or 0),
            "replicas": [r["replica"] for r in replicas if r.get("node_id") == n["NodeID"]],
        })  # fmt: skip
    return out


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = pool_nodes(args.address)
    if args.json:
        print(json.dumps({"data": nodes}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Nodes")
    for col in ("name", "health", "device", "chip", "CPUs", "memory GB", "replicas"):
        table.add_column(col)
    for n in nodes:
        health = "alive" if n["alive"] else "dead"
        table.add_row(n["name"], health, f"{n['kind']}: {n['device']}", n["chip"], f"{n['cpus']:g}",
                      f"{n['memory_gb']:g}", ", ".join(n["replicas"]) or "-")  # fmt: skip
    Console().print(table)
    return 0


# -- cumulo serve --cluster ---------------------------------------------------------------------------
def run_gateway(args: argparse.Namespace, settings: Any, refs: list[str] | None) -> int:
    """Serves the stored deployments from a pool: starts a Ray head here unless `--address` names one, keeps
    the deployments' replicas with a controller, and serves each model through its pool."""
    import uvicorn

    from cumulo.cli import console_ops, edge_fit
    from cumulo.cli.deploy import _source_and_name, check_spec
    from cumulo.cli.serve import _raise_stop, _Stop
    from cumulo.cluster.controller import Controller, Wanted
    from cumulo.cluster.ray_cluster import DEFAULT_PORT, Head, clear_address, connect, write_address
    from cumulo.service import deployments
    from cumulo.service.app import create_app
    from cumulo.service.bootstrap import ensure_admin_key

    signal.signal(signal.SIGTERM, _raise_stop)
    head = controller = app = None
    try:
        address = args.address
        if address is None:
            port = args.ray_port or int(os.environ.get("CUMULO_RAY_PORT", DEFAULT_PORT))
            host = args.ray_host or ("127.0.0.1" if settings.host in ("127.0.0.1", "localhost") else _my_ip())
            head = Head(port=port, host=host, num_cpus=args.head_cpus)
            address = head.address
        connect(address)
        # Again: connecting made Ray's own SIGTERM handler (exit 15) the current one.
        signal.signal(signal.SIGTERM, _raise_stop)
        write_address(address)
        app = create_app(settings, {})
        state = app.state.service
        created = ensure_admin_key(state)
        if created is not None:
            print(f"Created the admin key; it is in {created} (readable by you only) and is not shown again.")
        with state.sessions() as session, session.begin():
            stored = {row.model for row in deployments.list_deployments(session)}
            for ref in refs or ([] if stored else [_default_model()]):
                source, name = _source_and_name(ref, None)
                spec = check_spec(deployments.spec(name, source))
                if spec.model not in stored:
                    deployments.create_or_update(session, spec)

        def load_wanted() -> list[Wanted]:
            with state.sessions() as session:
                return [Wanted(r.model, r.source, r.replicas, r.format, r.chip, r.ttft_slo_ms, r.tpot_slo_ms,
                               r.min_replicas, r.max_replicas)
                        for r in deployments.list_deployments(session)]  # fmt: skip

        def publish(engines: dict) -> None:
            state.engines = engines  # one assignment: requests see the old dict or the new one, never half

        options = {"device": args.device} if args.device != "auto" else {}
        controller = Controller(load_wanted, publish, engine_options=options)
        app.state.deployment_check = check_spec
        app.state.deployment_status = controller.replicas
        console_ops.install(app, nodes=lambda: pool_nodes(address))
        edge_fit.install(app)  # POST /v1/edge/rollouts checks packages against device classes
        controller.start()
        print(f"Pool head at {address}. Add a machine with:  cumulo join {address}", flush=True)
        print(f"Serving the pool's deployments at http://{settings.host}:{settings.port}/v1", flush=True)
        print(f"Console: http://{settings.host}:{settings.port}/console/ (sign in with a key)", flush=True)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        if controller is not None:
            controller.stop(stop_replicas=head is not None)
        if head is not None:
            head.stop()
            clear_address()
        if app is not None:
            app.state.service.db.dispose()
    return 0


def _default_model() -> str:
    from cumulo.cli.serve import DEFAULT_MODEL

    return DEFAULT_MODEL


def _my_ip() -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
