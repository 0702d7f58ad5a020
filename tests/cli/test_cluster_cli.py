"""`cumulo join` and `cumulo nodes` against a real local Ray pool: a machine joins under its name with its
devices matched to a catalog chip, is listed, and leaves cleanly on Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import pytest

from cumulo.cluster.nodes import local_devices
from tests.support.ray_pool import shared_pool


def cumulo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cumulo.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def nodes(address: str) -> dict[str, dict]:
    listed = cumulo("nodes", "--address", address, "--json")
    assert listed.returncode == 0, listed.stderr
    return {n["name"]: n for n in json.loads(listed.stdout)["data"]}


def wait_for(condition, timeout: float = 120.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("condition not reached")


def test_join_lists_the_node_with_its_chip_and_ctrl_c_leaves_the_pool() -> None:
    address = shared_pool().address
    joined = subprocess.Popen(
        [sys.executable, "-m", "cumulo.cli.main", "join", address, "--name", "joiner", "--num-cpus", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        node = wait_for(lambda: (n := nodes(address).get("joiner")) and n["alive"] and n)
        cpu = next(d for d in local_devices() if d.kind == "cpu")
        assert node["kind"] == "cpu" and node["chip"] == cpu.chip and node["cpus"] == 1
        assert node["replicas"] == []
        joined.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = joined.communicate(timeout=90)
        assert joined.returncode == 0, err
        assert "Left the pool" in out
        wait_for(lambda: not nodes(address)["joiner"]["alive"])
    finally:
        if joined.poll() is None:
            joined.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["join", "no-port-here"], "address must be HOST:PORT"),
        (["join", "127.0.0.1:1", "--num-cpus", "0"], "--num-cpus must be at least 1"),
        (["nodes", "--address", "127.0.0.1:1"], "cannot reach the pool"),
    ],
)
def test_bad_pool_commands_fail_in_one_line(args: list[str], message: str) -> None:
    result = cumulo(*args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_nodes_without_a_pool_says_how_to_start_one(tmp_path) -> None:  # noqa: ANN001
    result = cumulo("--data-dir", str(tmp_path), "nodes")
    assert result.returncode == 1 and "cumulo serve --cluster" in result.stderr


def test_serve_cluster_starts_a_head_prints_the_join_line_and_stops_it_on_sigterm(tmp_path) -> None:  # noqa: ANN001
    import socket

    from tests.support.ray_pool import free_port

    def head_answers() -> bool:
        try:
            socket.create_connection(("127.0.0.1", ray_port), timeout=1).close()
            return True
        except OSError:
            return False

    ray_port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as sink:  # a file, not a pipe: a pipe nobody reads fills up and stalls the gateway
        gateway = subprocess.Popen(
            [sys.executable, "-m", "cumulo.cli.main", "--data-dir", str(tmp_path), "serve", "--cluster",
             "--port", str(free_port()), "--ray-port", str(ray_port), "--head-cpus", "0", "--log-level",
             "warning", "--model", "smollm2-135m"],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: "Serving the pool" in log.read_text(), timeout=120)
        out = log.read_text()
        assert f"cumulo join 127.0.0.1:{ray_port}" in out, out
        assert json.loads((tmp_path / "cluster.json").read_text())["address"] == f"127.0.0.1:{ray_port}"
        assert head_answers()  # the head runs beside the gateway
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(90) == 0, log.read_text()
        wait_for(lambda: not head_answers(), timeout=60)  # the head went with it
        assert not (tmp_path / "cluster.json").exists()
    finally:
        if gateway.poll() is None:
            gateway.kill()
        stop_head_on(ray_port)  # whatever happened above, no head is left behind


def stop_head_on(port: int) -> None:
    """SIGKILLs the session of the `ray start --head --port=PORT` process, if one still runs."""
    import os
    from pathlib import Path

    from tests.support.ray_pool import session_pids

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start" in args and f"--port={port}".encode() in args:
            for pid in session_pids(int(cmdline.parent.name)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
