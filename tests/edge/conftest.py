"""Fixtures of the edge tests: a trained shelf model package (once per session), a subscriber on the real
Mosquitto broker (127.0.0.1:1883) under a topic root of each test's own, and a TCP proxy in front of the broker
that a test stops and starts to cut the network."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cumulo.contracts.edge import Envelope, parse_envelope
from cumulo.edge.model import save_package, train_shelf_net

BROKER = ("127.0.0.1", 1883)
REPO = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def shelf_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_package(train_shelf_net(seed=0), tmp_path_factory.mktemp("edge-model") / "shelf.safetensors")


@pytest.fixture
def topic_root() -> str:
    return f"cumulo-test/{uuid.uuid4().hex[:12]}"


class Subscriber:
    """Everything published under `{root}/+/up/results`, parsed, in arrival order."""

    def __init__(self, root: str) -> None:
        self.received: list[Envelope] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{root}/+/up/results", qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._message
        self.client.connect(*BROKER)
        self.client.loop_start()
        assert self._ready.wait(10), "the test subscriber could not subscribe"

    def _message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        envelope = parse_envelope(message.payload)
        with self._lock:
            self.received.append(envelope)

    def seqs(self) -> list[int]:
        with self._lock:
            return [e.seq for e in self.received]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber(topic_root: str) -> Iterator[Subscriber]:
    sub = Subscriber(topic_root)
    yield sub
    sub.close()


class TcpProxy:
    """A port that forwards to the broker while started and refuses connections while stopped."""

    def __init__(self) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(BROKER)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """Close the port and cut every open connection, as a network outage would."""
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone leaves the port listening
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy()
    yield p
    p.stop()
