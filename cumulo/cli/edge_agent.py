"""`cumulo edge agent`: run the device side on this machine (registered under `cumulo edge` by cli/edge.py).

    cumulo edge agent --server URL --token T [--mqtt URL] [--source synthetic:shelf|synthetic:line|DIR|camera]
                      [--device-class imx500|rpi5|...]

The first start trades the one-time token for a credential, kept in the agent's data directory; later starts
need neither. SIGTERM or Ctrl-C stop it after a short drain of the outbox; what is left is sent on the next start.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, help="the Cumulo service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", default=None, help="one-time enrolment token (first start only)")
    parser.add_argument(
        "--mqtt", default=None, help="MQTT broker, e.g. mqtt://127.0.0.1:1883 (else HTTP only)"
    )
    parser.add_argument(
        "--source",
        default="synthetic:shelf",
        help="synthetic:shelf, synthetic:line, a folder of images, or camera",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scene")
    parser.add_argument("--fps", type=float, default=5.0, help="frames per second (0: as fast as it runs)")
    parser.add_argument("--change-every", type=float, default=20.0, help="synthetic: frames between changes")
    parser.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--model", type=Path, default=None, help="a model package to start with")
    parser.add_argument(
        "--format", default="mxint8", help="number format to run the model in (fp32, mxint8, fp8)"
    )
    parser.add_argument(
        "--device-class",
        default=None,
        help="what this device is, a chip id of the catalog (`cumulo chips`), e.g. imx500 or rpi5: told to the "
        "server, which checks rollouts against it, and a pushed model that does not fit it is refused here",
    )
    parser.add_argument("--topic-root", default=None, help="MQTT topic root (default cumulo/v1/devices)")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    parser.add_argument(
        "--fallback-after", type=float, default=10.0, help="seconds without a broker before HTTP"
    )
    parser.add_argument("--max-outbox", type=int, default=100_000, help="results kept while offline")
    parser.add_argument("--drain", type=float, default=5.0, help="seconds to keep sending when stopping")
    parser.add_argument("--data-dir", type=Path, default=None, help="the agent's own directory")


def run(args: argparse.Namespace) -> int:
    from cumulo.chips.catalog import get_chip
    from cumulo.contracts.edge import TOPIC_ROOT
    from cumulo.edge.agent import Agent, AgentSettings, enroll
    from cumulo.edge.sources import open_source
    from cumulo.edge.transport import mqtt_address
    from cumulo.paths import data_dir

    if args.mqtt:
        mqtt_address(args.mqtt)  # a bad URL is a one-line error before anything starts
    if args.device_class is not None:
        args.device_class = get_chip(args.device_class).id  # so is a class the catalog does not know
    home = args.data_dir or data_dir() / "edge-agent"
    home.mkdir(parents=True, exist_ok=True)
    source = open_source(args.source, args.seed, args.change_every)
    identity = enroll(home, args.server, args.token)
    settings = AgentSettings(
        server=args.server,
        mqtt_url=args.mqtt,
        topic_root=args.topic_root or TOPIC_ROOT,
        fps=args.fps,
        heartbeat_s=args.heartbeat,
        fallback_after=args.fallback_after,
        format=args.format,
        max_outbox=args.max_outbox,
        device_class=args.device_class,
    )
    agent = Agent(home, identity, source, settings, args.model)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    kind = f" ({args.device_class})" if args.device_class else ""
    print(f"edge agent {identity.device_id}{kind}: {args.source}, model {agent.model_ref or '-'}", flush=True)
    try:
        agent.run(args.frames, should_stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        pass
    finally:
        agent.drain(args.drain)
        left = agent.outbox.stats().pending
        agent.close()
    print(f"edge agent stopped after {agent.frames} frames; {left} results wait in the outbox", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `cumulo edge agent`'s own arguments (cli/edge.py hands over the rest of the command line)."""
    from cumulo.errors import CumuloError

    parser = argparse.ArgumentParser(prog="cumulo edge agent", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CumuloError as error:
        print(f"cumulo: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
