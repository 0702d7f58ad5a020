"""What the page tests share: a gateway serving tests/console/pages_server.py's two fake engines, and the
shortcuts every page test takes (open a page and wait for it to finish loading)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.service.live import LiveServer

SCRIPT = Path(__file__).with_name("pages_server.py")


@dataclass
class PagesServer(LiveServer):
    """The console's test gateway: tests/console/pages_server.py with its own fake models."""

    script: Path = SCRIPT
    model: str = "fake-model"
    fake: bool = True


def open_page(page: object, server: LiveServer, route: str, title: str) -> None:
    """Goes to `#/<route>` and waits until the page titled `title` has left its loading state."""
    page.goto(f"{server.url}/console/#/{route}")  # type: ignore[attr-defined]
    page.wait_for_selector(f'section.page[aria-busy=false] h1:text-is("{title}")')  # type: ignore[attr-defined]
