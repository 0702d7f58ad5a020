"""Test support: runs `cumulo serve` in this process, with the fake engine when CUMULO_FAKE_ENGINE=1.

    CUMULO_FAKE_ENGINE=1 python tests/service/live_server.py --data-dir D serve --port P [--database-url U]

With CUMULO_FAKE_ENGINE unset or 0 it is exactly `cumulo serve` (real models), so the live tests can be pointed
at the real engine by changing one variable. Fake knobs: CUMULO_FAKE_DELAY (seconds per token),
CUMULO_FAKE_MAX_MODEL_LEN, CUMULO_FAKE_STALL_AFTER (a sequence stops producing after that many tokens and
waits until aborted, as an engine in a long step: a known number of tokens reaches the client).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _fake_engines(
    refs: list[str],
    device: str,
    format: str | None,
    threads: int | None = None,
    in_process: bool = False,
    head: str | None = None,
) -> dict:
    from tests.service.fakes import FakeEngine

    delay = float(os.environ.get("CUMULO_FAKE_DELAY", "0"))
    max_len = int(os.environ.get("CUMULO_FAKE_MAX_MODEL_LEN", "256"))
    stall = os.environ.get("CUMULO_FAKE_STALL_AFTER")
    if stall:
        return {
            name: _stalling(FakeEngine)(int(stall), name, delay=delay, max_model_len=max_len) for name in refs
        }
    return {name: FakeEngine(name, delay=delay, max_model_len=max_len) for name in refs}


def _stalling(base: type) -> type:
    import asyncio

    class Stalling(base):  # type: ignore[misc, valid-type]
        def __init__(self, stall_after: int, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.stall_after = stall_after

        async def generate(self, prompt_token_ids, params, request_id=None):  # noqa: ANN001, ANN202
            produced = 0
            async for output in super().generate(prompt_token_ids, params, request_id):
                yield output
                produced += len(output.new_token_ids)
                if produced >= self.stall_after and not output.finished:
                    await asyncio.Event().wait()  # until the request is cancelled

    return Stalling


def main() -> int:
    from cumulo.cli import main as cli
    from cumulo.cli import serve

    if os.environ.get("CUMULO_FAKE_ENGINE", "0") not in ("", "0"):
        serve.load_engines = _fake_engines  # type: ignore[assignment]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
