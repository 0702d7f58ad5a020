"""Test support: `cumulo serve` for the page tests, with two fake engines whatever `--model` says:
`fake-model` (tests/service/fakes.py's phrase, a few milliseconds per token, so a chat streams), `slow-model`
(the same at 0.2 s per token, for stopping a stream) and `xss-model`, which answers markup meant to run script
if a page ever rendered model output as HTML. Deployments report one running replica each, as a pool's
controller would (`replicas`), so the nodes page has replicas to show without Ray.

    python tests/console/pages_server.py --data-dir D serve --port P --model fake-model
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

XSS = '<script>window.__x=1</script><img src=x onerror="window.__y=1">'


def scripted(text: str) -> type:
    """A FakeEngine that answers `text`, one character per step, then stops."""
    from cumulo.contracts import RequestOutput
    from tests.service.fakes import OFFSET, FakeEngine

    class Scripted(FakeEngine):
        async def generate(self, prompt_token_ids, params, request_id=None):  # noqa: ANN001, ANN202
            params.validate()
            chars = text[: params.max_tokens]
            for i, char in enumerate(chars):
                last = i == len(chars) - 1
                yield RequestOutput(
                    request_id=request_id or "scripted",
                    new_token_ids=[ord(char) + OFFSET],
                    new_text=char,
                    finished=last,
                    finish_reason="stop" if last else None,
                )

    return Scripted


def engines(refs: list[str], *args: object, **kwargs: object) -> dict:
    from tests.service.fakes import FakeEngine

    return {
        "fake-model": FakeEngine("fake-model", delay=0.01),
        "xss-model": scripted(XSS)("xss-model"),
        "slow-model": FakeEngine("slow-model", delay=0.2),  # for Stop: 200 tokens would take 40 s
    }


def replicas(model: str) -> list[dict]:
    """What a pool's controller reports for a deployment (`Controller.replicas`), one replica per model."""
    return [{
        "model": model, "replica": f"{model}-r0", "node": "node-a", "state": "running", "chip": "cpu-avx2-2core",
        "format": "q8_0", "in_flight": 1, "served": 12, "reason": "predicted TPOT 21 ms meets the 50 ms SLO",
        "error": None, "since": 1_800_000_000.0, "scaling": "",
    }]  # fmt: skip


def main() -> int:
    from cumulo.cli import console_ops, serve
    from cumulo.cli import main as cli

    serve.load_engines = engines  # type: ignore[assignment]
    install = console_ops.install

    def install_with_pool_view(app: object, nodes: object = None) -> None:
        install(app, nodes)  # type: ignore[arg-type]
        app.state.deployment_status = replicas  # type: ignore[attr-defined]

    console_ops.install = install_with_pool_view  # type: ignore[assignment]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
