"""SIGKILL the agent process mid-run while the network is down, start it again: every result arrives, none is
lost, and the seq counter continues where it was (a seq never names two different results)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cumulo.contracts.edge import Envelope
from cumulo.edge.agent import Identity
from cumulo.edge.outbox import Outbox
from tests.edge.conftest import REPO, Subscriber, TcpProxy, wait_for


def _agent(data_dir: Path, package: Path, proxy: TcpProxy, root: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "cumulo.cli.edge_agent", "--mqtt", proxy.url, "--topic-root", root]
    command += [
        "--data-dir",
        str(data_dir),
        "--model",
        str(package),
        "--change-every",
        "2",
        "--heartbeat",
        "3600",
    ]
    return subprocess.Popen(command + list(extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _pending(data_dir: Path) -> int:
    box = Outbox(data_dir / "outbox.db")
    try:
        return box.stats().pending
    finally:
        box.close()


def test_sigkill_mid_run_loses_nothing_and_seq_continues(
    tmp_path: Path, shelf_package: Path, topic_root: str, subscriber: Subscriber, proxy: TcpProxy
) -> None:
    Identity("dev-kill", "cred-kill").save(tmp_path)
    proxy.start()
    first = _agent(tmp_path, shelf_package, proxy, topic_root, "--fps", "20")
    try:
        wait_for(lambda: len(subscriber.seqs()) >= 5, what="the first results")
        proxy.stop()  # the network goes; the agent keeps making results into its outbox
        wait_for(lambda: _pending(tmp_path) >= 5, what="a backlog in the outbox")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    before = max(subscriber.seqs())
    backlog = _pending(tmp_path)
    assert backlog >= 5

    proxy.start()
    second = _agent(
        tmp_path, shelf_package, proxy, topic_root, "--fps", "0", "--frames", "60", "--drain", "60"
    )
    output = second.communicate(timeout=300)[0].decode()
    assert second.returncode == 0, output
    assert _pending(tmp_path) == 0
    box = Outbox(tmp_path / "outbox.db")
    made = box.stats().next_seq - 1
    box.close()
    assert made > before + backlog  # the restarted agent made new results, numbered after the old ones
    wait_for(lambda: len(set(subscriber.seqs())) >= made, what="every result at the subscriber")
    by_seq: dict[int, Envelope] = {}
    for envelope in subscriber.received:
        if envelope.seq in by_seq:  # in flight at the kill: sent again, and it must be the same result
            assert envelope.model_dump() == by_seq[envelope.seq].model_dump()
        by_seq[envelope.seq] = envelope
    assert sorted(by_seq) == list(range(1, made + 1))
