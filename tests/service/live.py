"""Starts and stops gateway processes for the live tests (uvicorn in a subprocess on a free port).

The fake engine serves by default. `CUMULO_FAKE_ENGINE=0 CUMULO_LIVE_MODEL=smollm2-135m` runs the same gateways
on the real engine instead, with the model store of the default data directory (nothing is downloaded).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SCRIPT = Path(__file__).with_name("live_server.py")
FAKE = os.environ.get("CUMULO_FAKE_ENGINE", "1") not in ("", "0")
MODEL = os.environ.get("CUMULO_LIVE_MODEL", "fake-model" if FAKE else "smollm2-135m")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    data_dir: Path
    database_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None
    log: Path | None = None
    model: str = MODEL  # what `--model` names
    fake: bool = FAKE  # serve with the fake engine (tests/service/fakes.py) instead of real engine processes
    script: Path = SCRIPT  # the gateway script the process runs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LiveServer:
        return self.launch().wait_ready(timeout)

    def launch(self) -> LiveServer:
        """Starts the process without waiting, so several gateways can boot side by side."""
        self.port = free_port()
        args = [
            sys.executable,
            str(self.script),
            "--data-dir",
            str(self.data_dir),
            "serve",
            "--port",
            str(self.port),
            "--model",
            self.model,
            "--log-level",
            "warning",
        ]
        if self.database_url:
            args += ["--database-url", self.database_url]
        # No fine-tuning worker unless a test asks for one: each would be one more polling process per gateway.
        env = {
            **os.environ,
            "CUMULO_FAKE_ENGINE": "1" if self.fake else "0",
            "CUMULO_FINETUNE_WORKERS": "0",
            **self.env,
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.fake and not (self.data_dir / "models").exists():
            from cumulo.paths import models_dir

            (self.data_dir / "models").symlink_to(models_dir())
        self.log = self.data_dir / f"server-{self.port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 60.0) -> LiveServer:
        assert self.process is not None and self.log is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{self.log.read_text()}")

    def admin_key(self) -> str:
        return (self.data_dir / "admin_key").read_text().strip()

    def kill(self) -> None:
        """kill -9: no shutdown handlers, no flushing."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
