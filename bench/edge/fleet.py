"""python -m bench.edge.fleet: the fleet path measured end to end on this machine, through Mosquitto
(127.0.0.1:1883), a gateway under uvicorn on SQLite, and one shelf-camera agent in this process.

1. Outage, then drain: the agent runs `--frames` frames at full speed with its broker out of reach (a port where
   nothing listens), so every result waits in its outbox; that is the rate results are made. Then it starts
   again on the same data directory with the real broker, and the clock runs until every result is acknowledged
   (PUBACK) and until every one is a row in the service's database: the drain rate, results/s delivered,
   against the rate they were made, in the same run.
2. Latency: the agent runs live at `--fps` for `--seconds`; each result is tied to the frame it came from (the
   time the frame was read), and frame -> row in the database is `received_at` (the gateway's clock) minus that
   time, on the same machine's clock: p50 and p95, and the part of it before the result is made (the model
   and the app: the result's own time, stored with it, minus the frame's).

A summary every frame (`summary_every=1`) gives every frame a result, as a busy shelf would. The load average is
recorded with the figures: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from cumulo.edge.agent import Agent, AgentSettings, enroll
from cumulo.edge.model import save_package, train_shelf_net
from cumulo.edge.sources import FrameSource, open_source

BROKER = "mqtt://127.0.0.1:1883"


class TimedSource(FrameSource):
    """A source that remembers when its last frame was read."""

    def __init__(self, inner: FrameSource) -> None:
        self.inner, self.kind, self.planogram = inner, inner.kind, inner.planogram
        self.read_at = 0.0

    def next(self) -> torch.Tensor:
        frame = self.inner.next()
        self.read_at = time.time()
        return frame


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_gateway(data: Path, root: str) -> tuple[str, Any]:
    import uvicorn

    from cumulo.service.app import create_app
    from cumulo.service.settings import Settings

    config = Settings(  # type: ignore[call-arg]
        data_dir=data,
        database_url=f"sqlite:///{data / 'service.db'}",
        edge_mqtt_url=BROKER,
        edge_topic_root=root,
        edge_mqtt_client_id=f"bench-{uuid.uuid4().hex[:8]}",
        edge_check_seconds=0.5,
    )
    app = create_app(config, {})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    if not app.state.edge_bridge.connected.wait(20):
        raise SystemExit("the gateway could not reach Mosquitto on 127.0.0.1:1883")
    return f"http://127.0.0.1:{port}", server


def enrolment_token(data: Path) -> str:
    """An organisation and a device, made with the command line on the gateway's database."""
    cli = [sys.executable, "-m", "cumulo.cli.main"]
    db = ["--database-url", f"sqlite:///{data / 'service.db'}", "--data-dir", str(data)]
    subprocess.run([*cli, "admin", "key", "create", "--org", "bench", *db], check=True, capture_output=True)
    made = subprocess.run(
        [*cli, "edge", "enroll", "--org", "bench", "--device-id", "bench-cam", "--json", *db],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(made.stdout.splitlines()[-1])["enrollment_token"]


def stored(data: Path, first_seq: int = 0) -> list[tuple[int, float, float]]:
    """(seq, time made on the device, received_at) of the device's results in the service database."""
    with sqlite3.connect(data / "service.db") as db:
        return db.execute(
            "SELECT seq, time, received_at FROM edge_results WHERE seq >= ? ORDER BY seq", (first_seq,)
        ).fetchall()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames made during the outage")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the latency run")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the latency run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/edge_fleet.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cumulo-bench-edge-") as tmp:
        data, home = Path(tmp) / "service", Path(tmp) / "device"
        data.mkdir()
        home.mkdir()
        root = f"bench-{uuid.uuid4().hex[:8]}/devices"
        url, server = start_gateway(data, root)
        package = save_package(train_shelf_net(seed=0), Path(tmp) / "shelf.safetensors")
        identity = enroll(home, url, enrolment_token(data))
        common = {"topic_root": root, "fps": 0.0, "heartbeat_s": 1.0, "summary_every": 1}

        # 1. outage: no broker, no HTTP; every result waits in the outbox
        dead = AgentSettings(mqtt_url=f"mqtt://127.0.0.1:{free_port()}", fallback_after=1e9, **common)
        agent = Agent(home, identity, open_source("synthetic:shelf", 1, 3), dead, package)
        started = time.perf_counter()
        agent.run(max_frames=args.frames)
        made_s = time.perf_counter() - started
        backlog = agent.outbox.stats().pending
        agent.close()

        # ... then the broker is back: time to every PUBACK and to every row
        live = AgentSettings(mqtt_url=BROKER, **common)
        agent = Agent(home, identity, open_source("synthetic:shelf", 1, 3), live, package)
        started, wall = time.perf_counter(), time.time()  # the agent is up (model loaded); connecting counts
        while agent.outbox.stats().pending:
            agent.pump()
        acked_s = time.perf_counter() - started
        last, quiet = -1, time.monotonic()
        while (count := len(stored(data))) < backlog and time.monotonic() - quiet < 10:
            if count != last:  # wait until every row is in, or none came for 10 s (lost on the way)
                last, quiet = count, time.monotonic()
            agent.pump()
            time.sleep(0.05)
        rows = stored(data)
        delivered = len(rows)
        rows_s = max(at for _, _, at in rows) - wall if rows else float("nan")
        agent.close()

        # 2. latency, live: frame read -> results made -> row in the database
        source = TimedSource(open_source("synthetic:shelf", 2, 3))
        agent = Agent(
            home, identity, source, AgentSettings(mqtt_url=BROKER, **common | {"fps": args.fps}), package
        )
        while not (agent.sender.mqtt and agent.sender.mqtt.connected):
            agent.pump()
            time.sleep(0.01)
        first_seq = agent.outbox.stats().next_seq
        frame_of: dict[int, float] = {}
        period, end = 1.0 / args.fps, time.monotonic() + args.seconds
        while time.monotonic() < end:
            tick = time.monotonic()
            before = agent.outbox.stats().next_seq
            agent.step()
            after = agent.outbox.stats().next_seq
            for seq in range(before, after):
                frame_of[seq] = source.read_at
            while time.monotonic() < tick + period:
                agent.pump()
                time.sleep(0.002)
        agent.drain(60)
        deadline = time.monotonic() + 60
        while len(stored(data, first_seq)) < len(frame_of) and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = [(frame_of[seq], made, at) for seq, made, at in stored(data, first_seq) if seq in frame_of]
        latency_ms = [(at - frame) * 1e3 for frame, _, at in rows]
        model_ms = [(made - frame) * 1e3 for frame, made, _ in rows]  # frame read -> result in the outbox
        agent.close()
        server.should_exit = True
    load_after = os.getloadavg()
    record = {
        "load_avg_before": load_before, "load_avg_after": load_after, "cpus": os.cpu_count(),
        "outage": {"frames": args.frames, "results": backlog, "seconds": made_s, "made_per_s": backlog / made_s},
        "drain": {
            "delivered": delivered, "acked_seconds": acked_s, "stored_seconds": rows_s,
            "acked_per_s": backlog / acked_s, "stored_per_s": delivered / rows_s, "lost": backlog - delivered,
            "stored_vs_made": (delivered / rows_s) / (backlog / made_s),
        },
        "latency": {
            "fps": args.fps, "results": len(latency_ms),
            "frame_to_db_ms_p50": statistics.median(latency_ms), "frame_to_db_ms_p95": percentile(latency_ms, 0.95),
            "model_ms_p50": statistics.median(model_ms), "model_ms_p95": percentile(model_ms, 0.95),
        },
    }  # fmt: skip
    o, d, lat = record["outage"], record["drain"], record["latency"]
    print(f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"outage: {o['results']} results from {o['frames']} frames in {o['seconds']:.1f} s ({o['made_per_s']:.0f}/s made)"
    )
    print(
        f"drain: all acknowledged by the broker in {d['acked_seconds']:.1f} s ({d['acked_per_s']:.0f}/s); "
        f"{d['delivered']} stored in {d['stored_seconds']:.1f} s ({d['stored_per_s']:.0f}/s, "
        f"{d['stored_vs_made']:.2f}x the rate made); LOST {d['lost']}"
    )
    print(
        f"latency at {lat['fps']:.0f} frames/s, {lat['results']} results: frame -> database p50 "
        f"{lat['frame_to_db_ms_p50']:.1f} ms, p95 {lat['frame_to_db_ms_p95']:.1f} ms "
        f"(of which frame -> result made, the model and the app, p50 {lat['model_ms_p50']:.1f} ms)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
