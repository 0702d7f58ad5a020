"""Two "hosts" on one machine: Linux network namespaces joined by a veth pair, so a pool's nodes talk over a
real network link that a test can cut. Needs root and iproute2 (`ip netns`).

Each pair gets names with this process's pid and a random tag, and a random 10.x.y.0/24, so parallel runs do
not meet; the namespaces reach nothing but each other. `destroy()` kills every process left in them and deletes
them (their veths go with them); pairs left by a test process that was killed are swept by the next one.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "cumulo-test-"  # namespaces named cumulo-test-<pid>-<tag>-<side>
IFNAME = "veth0"  # each namespace holds one end of the pair under this name


def available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Host:
    namespace: str
    address: str  # its IPv4 address on the link
    temp_dir: Path  # its own RAY_TMPDIR, as a separate machine has its own /tmp

    def command(self, *args: str, env: dict[str, str] | None = None) -> list[str]:
        """`args` run inside this host's namespace, with `env` set there."""
        pairs = [f"{k}={v}" for k, v in {"RAY_TMPDIR": str(self.temp_dir), **(env or {})}.items()]
        return ["ip", "netns", "exec", self.namespace, "env", *pairs, *args]

    def pids(self) -> list[int]:
        out = ip("netns", "pids", self.namespace, check=False).stdout
        return [int(p) for p in out.split()]


class HostPair:
    """Hosts `a` (10.x.y.1) and `b` (10.x.y.2) on one point-to-point link, loopback up on each."""

    def __init__(self) -> None:
        sweep_stale()
        tag = f"{os.getpid()}-{random.randrange(16**6):06x}"
        net = f"10.{random.randrange(1, 255)}.{random.randrange(0, 256)}"
        self.a = Host(f"{PREFIX}{tag}-a", f"{net}.1", Path(f"/tmp/cn-{tag}-a"))
        self.b = Host(f"{PREFIX}{tag}-b", f"{net}.2", Path(f"/tmp/cn-{tag}-b"))
        try:
            for host in (self.a, self.b):
                host.temp_dir.mkdir(parents=True)
                ip("netns", "add", host.namespace)
                ip("-n", host.namespace, "link", "set", "lo", "up")  # Ray talks to itself over loopback too
            # both ends are made inside their namespaces: no name is ever taken in the machine's own
            ip("link", "add", IFNAME, "netns", self.a.namespace, "type", "veth",
               "peer", "name", IFNAME, "netns", self.b.namespace)  # fmt: skip
            for host in (self.a, self.b):
                ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", IFNAME)
                ip("-n", host.namespace, "link", "set", IFNAME, "up")
        except BaseException:
            self.destroy()
            raise

    def cut_command(self) -> list[str]:
        """Takes b's end of the link down: from then on no packet passes either way."""
        return ["ip", "-n", self.b.namespace, "link", "set", IFNAME, "down"]

    def destroy(self) -> None:
        for host in (self.a, self.b):
            destroy_namespace(host.namespace)
            shutil.rmtree(host.temp_dir, ignore_errors=True)


def destroy_namespace(namespace: str) -> None:
    """SIGKILLs every process in `namespace` until none is left, then deletes it (and its veth)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = Host(namespace, "", Path()).pids()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    ip("netns", "delete", namespace, check=False)


def sweep_stale() -> None:
    """Deletes the namespaces of test processes that no longer run (killed before their finalizers ran)."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            destroy_namespace(name)
            tag = name[len(PREFIX) :].rsplit("-", 1)[0]
            shutil.rmtree(f"/tmp/cn-{tag}-{name[-1]}", ignore_errors=True)
