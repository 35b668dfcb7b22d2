"""How generations leave: SSE event streams that always clean up, and waits that stop when the client leaves."""
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from slimserve.serve.errors import error_body
from slimserve.serve.protocol import Usage
from slimserve.serve.generation import Generation

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse_event(body: BaseModel | dict) -> bytes:
    data = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body, ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


class EventStream(StreamingResponse):
    """`data: {chunk}` events, then `data: [DONE]`. An error after the first byte becomes an error
    event (the status line is gone by then). The generation is closed however the response ends,
    a client that leaves before the first byte included."""

    def __init__(self, events: AsyncIterator[bytes], generation: Generation):
        super().__init__(self._guarded(events, generation), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # a client disconnect cancels the scope we run in
                await self.generation.aclose()

    @staticmethod
    async def _guarded(events: AsyncIterator[bytes], generation: Generation) -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except Exception as error:  # reported to the client as an error event, and logged
            if generation.client.draining:  # the drain timeout stopped the engine under it
                logger.warning("generation %s ended by the drain: %s", generation.request_id, error)
            else:
                logger.exception("generation %s failed mid-stream", generation.request_id)
            generation.log.error = f"{type(error).__name__}: {error}"
            status = 503 if generation.client.draining else 500
            yield sse_event(error_body(status, f"generation failed: {error}"))
        yield DONE


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """(True, work's result), or (False, None) if the client left first; work is then cancelled."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_left = not task.done()
        watcher.cancel()
        task.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if client_left:
        return False, None
    return True, task.result()


async def json_when_complete(request: Request, generation: Generation, collect: Coroutine[Any, Any, list],
                             build: Callable[[list, Usage], BaseModel]) -> Response:
    """A non-streamed answer: build(choices collected, usage) as JSON, or an empty 499 if the client
    left first (collect is then cancelled and the generation closed, which aborts it)."""
    try:
        finished, choices = await unless_disconnected(request, collect)
    finally:
        await generation.aclose()
    if not finished:
        return Response(status_code=499)  # nginx's "client closed request", for the access log only
    return Response(build(choices, generation.usage()).model_dump_json(), media_type="application/json")
