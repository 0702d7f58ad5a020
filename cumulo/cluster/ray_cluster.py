"""Starting, joining and finding the Ray cluster that pools Cumulo's machines.

`cumulo serve --cluster` starts a Ray head beside the gateway (`start_head`) and writes its address to the data
directory, where `cumulo nodes`, `cumulo deployments` and a second gateway find it (`find_address`); `cumulo join
ADDRESS` runs a worker node in the foreground (`join_command`). Each node describes its devices with labels and
resources (`cluster/nodes.py`).

Ports: Ray's default head port 6379 is Redis's on these machines, so the head listens on 6380 unless told
otherwise (`CUMULO_RAY_PORT`). Health checks are tightened so a dead node is noticed within about 2-3 s (see
`HEALTH_CHECK_ENV`); Ray's defaults take about 15 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cumulo.cluster.nodes import Device, default_node_name, local_devices, node_labels, node_resources
from cumulo.errors import CumuloError
from cumulo.paths import data_dir

DEFAULT_PORT = 6380
NAMESPACE = "cumulo"
ADDRESS_FILE = "cluster.json"
START_TIMEOUT_S = 60.0

# Read by Ray's GCS on the head: a node that misses 3 checks 500 ms apart is declared dead (2.6-2.9 s measured
# over a cut veth link).
HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


class ClusterError(CumuloError):
    """The pool could not be started, joined or found."""


def ray_executable() -> str:
    """The `ray` command installed beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise ClusterError("the 'ray' command is not installed; run scripts/setup.sh")
    return found


def node_args(name: str, devices: list[Device], num_cpus: int | None, memory_gib: float | None) -> list[str]:
    """`ray start` arguments that describe this node: its name, chips, CPUs and memory."""
    args = [
        "--labels",
        json.dumps(node_labels(name, devices)),
        "--resources",
        json.dumps(node_resources(devices)),
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    if memory_gib is not None:
        args += ["--memory", str(int(memory_gib * 1024**3))]
    # The object store holds only small messages here (deltas, descriptions): keep it from taking RAM.
    args += ["--object-store-memory", str(200 * 1024**2)]
    return args


def head_command(
    port: int, host: str, name: str, num_cpus: int | None = None, memory_gib: float | None = None
) -> list[str]:
    return [
        ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--node-ip-address={host}",
        "--include-dashboard=false",
        *node_args(name, local_devices(), num_cpus, memory_gib),
    ]


def join_command(
    address: str, name: str | None = None, num_cpus: int | None = None, memory_gib: float | None = None
) -> list[str]:
    """`ray start` for a worker node that joins the pool at `address` and stays in the foreground."""
    check_address(address)
    return [
        ray_executable(),
        "start",
        f"--address={address}",
        "--block",
        *node_args(name or default_node_name(), local_devices(), num_cpus, memory_gib),
    ]


def check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"address must be HOST:PORT (the head's), not {address!r}")


class Head:
    """A Ray head started by this process (`ray start --head --block` as a child), stopped with it."""

    def __init__(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", name: str | None = None,
                 num_cpus: int | None = None, memory_gib: float | None = None) -> None:  # fmt: skip
        self.address = f"{host}:{port}"
        env = {**os.environ, **HEALTH_CHECK_ENV}
        self._process = subprocess.Popen(
            head_command(port, host, name or default_node_name(), num_cpus, memory_gib),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the gateway, which stops the head on its way out
        )
        try:
            wait_for_head(self.address, self._process)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(5)
        if self._process.stderr is not None:
            self._process.stderr.close()


def wait_for_head(
    address: str, process: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S
) -> None:
    """Waits until a GCS answers at `address` (or the process starting it exits)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "")
            raise ClusterError(f"the Ray head did not start at {address}: {last or 'it exited'}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            return
        time.sleep(0.3)
    raise ClusterError(f"the Ray head did not answer at {address} within {timeout:.0f} s")


def connect(address: str) -> None:
    """Connects this process to the pool at `address` (once; later calls are no-ops)."""
    import ray

    check_address(address)
    if ray.is_initialized():
        return
    host, _, port = address.rpartition(":")
    try:  # Ray retries an unreachable head for minutes: ask the port first
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the pool at {address}: {exc.strerror or exc}") from None
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level="error", log_to_driver=False)
    except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError, depending on what failed
        raise ClusterError(f"cannot reach the pool at {address}: {exc}") from exc


def write_address(address: str, directory: Path | None = None) -> Path:
    path = (directory or data_dir()) / ADDRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"address": address}) + "\n", encoding="utf-8")
    return path


def find_address(given: str | None = None, directory: Path | None = None) -> str:
    """`--address` when given, else the one `cumulo serve --cluster` wrote to the data directory."""
    if given:
        check_address(given)
        return given
    path = (directory or data_dir()) / ADDRESS_FILE
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["address"])
    except (OSError, ValueError, KeyError):
        raise ClusterError(
            f"no pool found: start one with 'cumulo serve --cluster' or pass --address HOST:PORT ({path})"
        ) from None


def clear_address(directory: Path | None = None) -> None:
    with contextlib.suppress(OSError):
        ((directory or data_dir()) / ADDRESS_FILE).unlink()
