"""A real local Ray pool for tests: a head and worker nodes, each a `ray start --block` process group of its
own, so a test can SIGKILL one node (raylet, workers and all) as a machine that dies."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cumulo.cluster.ray_cluster import HEALTH_CHECK_ENV, ray_executable, wait_for_head

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    process: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL to the whole node at once, as a machine that dies: `ray start`, its raylet and every worker
        on it. Ray gives each worker a process group of its own (a replica would outlive a SIGKILL to the node's
        group by about a second, streaming on), but all stay in the session `start_new_session` made."""
        for _ in range(2):
            for pid in session_pids(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process.wait(10)


def session_pids(sid: int) -> list[int]:
    """Every process of session `sid` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()  # state ppid pgrp session ...
            if int(fields[3]) == sid:
                pids.append(int(stat.parent.name))
    return pids


@dataclass
class LocalPool:
    address: str
    head: Node
    nodes: dict[str, Node] = field(default_factory=dict)

    @classmethod
    def start(cls, head_cpus: int = 0) -> LocalPool:
        port = free_port()
        address = f"127.0.0.1:{port}"
        head = Node("head", _start([
            "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
            f"--num-cpus={head_cpus}",
            "--labels", json.dumps({"cumulo-name": "head", "cumulo-kind": "cpu", "cumulo-chip": "cpu-avx2-2core"}),
        ]))  # fmt: skip
        wait_for_head(address, head.process)
        return cls(address, head)

    def add_node(self, name: str, num_cpus: int = 1, chip: str = "cpu-avx2-2core") -> Node:
        labels = {"cumulo-name": name, "cumulo-kind": "cpu", "cumulo-chip": chip}
        node = Node(name, _start([
            f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            "--labels", json.dumps(labels), "--resources", json.dumps({f"chip:{chip}": 1}),
        ], Path(os.environ.get("CUMULO_TEST_RAY_LOG", os.devnull))))  # fmt: skip
        self.nodes[name] = node
        return node

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> dict[str, str]:
        """Waits until `count` nodes are alive; returns node name -> Ray node id."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            alive = {n["Labels"].get("cumulo-name", ""): n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if len(alive) >= count or time.monotonic() > deadline:
                return alive
            time.sleep(0.3)

    def stop(self) -> None:
        """Kills every node at once: a test pool keeps nothing worth a graceful drain."""
        for node in [*self.nodes.values(), self.head]:
            node.kill()


def _start(args: list[str], log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, **HEALTH_CHECK_ENV, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [
            ray_executable(),
            "start",
            "--block",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            *args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab") if log else subprocess.DEVNULL,  # noqa: SIM115 (the child keeps it)
        start_new_session=True,
        cwd=ROOT,
    )


_shared: LocalPool | None = None


def shared_pool() -> LocalPool:
    """One head (no CPUs: it runs no replicas) for the whole test session, connected to this process; modules
    add the nodes they need. Stopped when the test process exits."""
    global _shared
    if _shared is None:
        import atexit

        import ray

        from cumulo.cluster.ray_cluster import connect

        pool = LocalPool.start()
        atexit.register(lambda: (ray.shutdown(), pool.stop()))
        connect(pool.address)
        _shared = pool
    return _shared


def node_with(name: str, num_cpus: int = 1, chip: str = "cpu-avx2-2core") -> str:
    """The Ray node id of node `name` in the shared pool, started (and waited for) if it is not running."""
    import ray

    pool = shared_pool()
    if name not in pool.nodes or pool.nodes[name].process.poll() is not None:
        pool.add_node(name, num_cpus, chip)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for n in ray.nodes():
            if n["Alive"] and n["Labels"].get("cumulo-name") == name:
                return n["NodeID"]
        time.sleep(0.3)
    raise RuntimeError(f"node {name} did not join the test pool")


def make_ray_replica():
    """A tiny engine in a Ray replica on the conformance node (for tests/contracts)."""
    import uuid

    from cumulo.cluster.replica import RayReplica
    from tests.support.tiny import make_tiny_engine

    node = node_with("conformance", num_cpus=2)
    return RayReplica.start("tiny", name=f"conformance#{uuid.uuid4().hex[:8]}", node_id=node,
                            factory=make_tiny_engine)  # fmt: skip
