"""`cumulo edge simulate` and `cumulo edge model`: a fleet of simulated shelf cameras on one machine, and model
packages to roll out to it (registered under `cumulo edge` by cli/edge.py).

    cumulo edge simulate --devices 20 --server URL [--mqtt URL] [--org ORG]

Each device is added to the organisation on the service database (as `cumulo edge enroll` does), trades its
token at the server, and runs as an agent thread in this one process: one torch and one model file for all, but
its own data directory, outbox, broker connection and scene seed, so the devices see different shelves. Threads
and not processes because twenty copies of torch would take gigabytes. A second run finds the devices enrolled
in their data directories and carries on, outboxes included.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import threading
import time
from pathlib import Path
from typing import Any


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=20, help="how many devices (1 to 200)")
    parser.add_argument("--server", required=True, help="the Cumulo service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--mqtt", default=None, help="MQTT broker, e.g. mqtt://127.0.0.1:1883 (else HTTP)")
    parser.add_argument("--org", default="demo", help="the organisation (created when missing)")
    parser.add_argument("--database-url", default=argparse.SUPPRESS, help="SQLAlchemy URL of the database")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-00, PREFIX-01, ...")
    parser.add_argument("--fleet-dir", type=Path, default=None, help="data directories of the devices")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second of each device")
    parser.add_argument("--change-every", type=float, default=20.0, help="frames between shelf changes")
    parser.add_argument("--frames", type=int, default=None, help="stop after this many frames per device")
    parser.add_argument("--seed", type=int, default=0, help="device i shows the scene of seed SEED + i")
    parser.add_argument("--topic-root", default=None, help="MQTT topic root (default cumulo/v1/devices)")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to keep sending when stopping")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="where to write the package (.safetensors)")
    parser.add_argument("--seed", type=int, default=1, help="training seed (the built-in model is seed 0)")
    parser.add_argument("--format", default="mxint8", help="number format the devices run it in")


def run_model(args: argparse.Namespace) -> int:
    """Trains the shelf model with a seed and writes a package; prints what `cumulo edge deploy` needs."""
    from cumulo.edge.model import save_package, train_shelf_net

    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = save_package(train_shelf_net(seed=args.seed), args.out, args.format)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path} sha256 {sha}")
    print(
        f"deploy: cumulo edge deploy --org ORG --name shelf --version VERSION --sha256 {sha} --url {path.resolve().as_uri()}"
    )
    return 0


def _tokens(args: argparse.Namespace, names: list[str], homes: dict[str, Path]) -> dict[str, str]:
    """One-time tokens for the devices not enrolled yet in their data directories."""
    from sqlalchemy import select

    from cumulo.cli.database import service_sessions
    from cumulo.cli.edge import _hasher
    from cumulo.errors import Conflict
    from cumulo.service import crud
    from cumulo.service.edge import devices
    from cumulo.service.edge.tables import EdgeDevice
    from cumulo.service.settings import Settings

    todo = [n for n in names if not (homes[n] / "device.json").exists()]
    if not todo:
        return {}
    ttl, hasher, now = Settings.from_env().edge_enroll_ttl_seconds, _hasher(), time.time()
    tokens = {}
    with service_sessions(args) as sessions, sessions() as session, session.begin():
        org = crud.get_or_create_org(session, args.org)
        for name in todo:
            device = session.scalar(select(EdgeDevice).where(EdgeDevice.device_id == name))
            if device is None:
                device, tokens[name] = devices.create(session, hasher, org.id, name, "simulated", now, ttl)
            elif device.org_id == org.id:  # its data directory is gone: a replaced camera
                tokens[name] = devices.reissue_token(device, hasher, now, ttl)
            else:
                raise Conflict(f"device id {name!r} belongs to another organisation; choose another --prefix")
    return tokens


def run_simulate(args: argparse.Namespace) -> int:
    import torch

    from cumulo.contracts.edge import TOPIC_ROOT
    from cumulo.edge.agent import Agent, AgentSettings, enroll
    from cumulo.edge.model import save_package, train_shelf_net
    from cumulo.edge.sources import open_source
    from cumulo.edge.transport import mqtt_address
    from cumulo.errors import InvalidRequest
    from cumulo.paths import data_dir

    if not 1 <= args.devices <= 200:
        raise InvalidRequest(f"--devices must be 1 to 200, got {args.devices}")
    if args.mqtt:
        mqtt_address(args.mqtt)
    torch.set_num_threads(1)  # many agents share the cores; one thread each keeps them from fighting
    fleet_dir = args.fleet_dir or data_dir() / "edge-fleet"
    names = [f"{args.prefix}-{i:02d}" for i in range(args.devices)]
    homes = {n: fleet_dir / n for n in names}
    for home in homes.values():
        home.mkdir(parents=True, exist_ok=True)
    model = fleet_dir / "shelf-v1.safetensors"
    if not model.exists():  # trained once for the whole fleet (seed 0), not once per device
        save_package(train_shelf_net(seed=0), model.with_suffix(".tmp"))
        model.with_suffix(".tmp").replace(model)
    tokens = _tokens(args, names, homes)
    identities = {n: enroll(homes[n], args.server, tokens.get(n)) for n in names}
    settings = AgentSettings(
        server=args.server,
        mqtt_url=args.mqtt,
        topic_root=args.topic_root or TOPIC_ROOT,
        fps=args.fps,
        heartbeat_s=args.heartbeat,
    )
    stop = threading.Event()
    agents: dict[str, Any] = {}

    def device(index: int, name: str) -> None:
        # Built in its own thread: the outbox's SQLite connection belongs to the thread that opened it.
        agent = None
        try:
            source = open_source("synthetic:shelf", args.seed + index, args.change_every)
            agent = agents[name] = Agent(homes[name], identities[name], source, settings, model)
            agent.run(args.frames, should_stop=stop.is_set)
        except Exception as error:  # one device failing must not take the fleet down
            print(f"{name}: stopped: {(str(error) or type(error).__name__).splitlines()[0]}", flush=True)
        finally:
            if agent is not None:
                agent.drain(args.drain)
                agent.close()

    threads = [threading.Thread(target=device, args=(i, n), name=n, daemon=True) for i, n in enumerate(names)]
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"{len(names)} devices of {args.org} ({names[0]} .. {names[-1]}) -> {args.mqtt or args.server}")
    print(f"data directories under {fleet_dir}; Ctrl-C stops them", flush=True)
    for thread in threads:
        thread.start()
    next_line = time.monotonic() + 30
    try:
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(0.2)
            if time.monotonic() >= next_line:
                next_line += 30
                running = list(agents.values())
                frames = sum(a.frames for a in running)
                print(f"{len(running)} agents, {frames} frames so far", flush=True)
    except KeyboardInterrupt:
        stop.set()
        for thread in threads:
            thread.join(args.drain + 5)
    frames = sum(a.frames for a in agents.values())
    print(f"fleet stopped after {frames} frames", flush=True)
    return 0
