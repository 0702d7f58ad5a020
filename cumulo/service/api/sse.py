"""Server-sent events: the `data: ...` framing and a streaming response that always cleans up after itself."""

from __future__ import annotations

import json
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class EventStream(StreamingResponse):
    """SSE response that notices a client leaving even while no token is due, and always closes the body
    iterator (whose `finally` aborts and settles the request). `finalizer` runs last, for the case where the
    iterator never started (client gone before the first byte), so the request is settled in every case."""

    finalizer: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self.stream_response(send)
            except OSError:
                pass  # the client went away between two chunks
            finally:
                with anyio.CancelScope(shield=True):
                    aclose = getattr(self.body_iterator, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    if self.finalizer is not None:
                        await self.finalizer()
                group.cancel_scope.cancel()
