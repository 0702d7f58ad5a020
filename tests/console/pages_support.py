"""What the page tests share: a gateway serving tests/console/pages_server.py's two fake engines, and the
shortcuts every page test takes (open a page and wait for it to finish loading)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.service.live import LiveServer, free_port

SCRIPT = Path(__file__).with_name("pages_server.py")


class PagesServer(LiveServer):
    def launch(self) -> PagesServer:
        self.port = free_port()
        args = [
            sys.executable,
            str(SCRIPT),
            "--data-dir",
            str(self.data_dir),
            "serve",
            "--port",
            str(self.port),
        ]
        args += ["--model", "fake-model", "--log-level", "warning"]
        env = {**os.environ, "CUMULO_FINETUNE_WORKERS": "0"}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.data_dir / f"server-{self.port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self


def open_page(page: object, server: LiveServer, route: str, title: str) -> None:
    """Goes to `#/<route>` and waits until the page titled `title` has left its loading state."""
    page.goto(f"{server.url}/console/#/{route}")  # type: ignore[attr-defined]
    page.wait_for_selector(f'section.page[aria-busy=false] h1:text-is("{title}")')  # type: ignore[attr-defined]
