"""The app's outer layer, before any handler runs: request id, API keys, body size; after: access log, HTTP metrics.

Plain ASGI rather than BaseHTTPMiddleware, so streaming responses and client disconnects pass through untouched.
"""
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimserve.config import ServeConfig
from slimserve.serve.errors import APIError, error_response
from slimserve.serve.generation import RequestLog
from slimserve.serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("slimserve.access")

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_DRAINED_FACTOR = 16  # an oversized body is read (and dropped) up to 16x the limit, so the client sees the 413


class HTTPGuard:
    def __init__(self, app: ASGIApp, config: ServeConfig, metrics: ServeMetrics, public_paths: set[str],
                 route_paths: set[str]):
        """public_paths need no API key; route_paths label the HTTP metrics (others count as "unmatched")."""
        self.app = app
        self.max_body_bytes = config.max_body_bytes
        self.metrics = metrics
        self.public_paths = public_paths
        self.route_paths = route_paths
        # Keys are compared as SHA-256 digests: equal lengths, so compare_digest's time says nothing.
        self.key_digests = [hashlib.sha256(key.encode()).digest() for key in config.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = dict(scope["headers"])
        client_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = client_id if _CLIENT_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
        log = RequestLog()
        scope.setdefault("state", {})["log"] = log  # handlers see it as request.state.log
        status = 500  # stays so if no response starts: the server died mid-request
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.active_requests.inc()
        try:
            if not self._authorized(scope["path"], headers):
                error = APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, send_with_id)
                return
            body = await self._read_body(headers, receive)
            if body is None:
                error = APIError(413, f"the request body is larger than this server's limit of "
                                      f"{self.max_body_bytes} bytes", code="request_too_large")
                await error_response(error)(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, _replay(body, receive), send_with_id)
            except Exception as error:  # a bug: answered 500 here, so uvicorn need not drop the connection
                if started:
                    raise
                logger.exception("%s %s failed", scope["method"], scope["path"])
                await error_response(APIError(500, f"internal server error: {type(error).__name__}: {error}"))(
                    scope, receive, send_with_id)
        finally:
            self.metrics.active_requests.dec()
            duration = time.monotonic() - start
            handler = scope["path"] if scope["path"] in self.route_paths else "unmatched"
            self.metrics.observe_http(scope["method"], handler, status, duration)
            access_logger.info(json.dumps({
                "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": request_id,
                "method": scope["method"], "path": scope["path"], "status": status,
                "latency_s": round(duration, 4), "prompt_tokens": log.prompt_tokens,
                "completion_tokens": log.completion_tokens,
                "ttft_s": None if log.ttft_s is None else round(log.ttft_s, 4),
                "finish_reasons": log.finish_reasons, "error": log.error}))

    def _authorized(self, path: str, headers: dict[bytes, bytes]) -> bool:
        if not self.key_digests or path in self.public_paths:
            return True
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(key.strip().encode("latin-1")).digest()
        matches = [hmac.compare_digest(digest, known) for known in self.key_digests]  # all keys, always
        return any(matches)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The whole body, or None if it is over the limit (then read no further than the drain cap)."""
        declared = headers.get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            size += len(message.get("body", b""))
            too_large = too_large or size > self.max_body_bytes
            if not too_large:
                chunks.append(message.get("body", b""))
            if not message.get("more_body", False) or size > MAX_DRAINED_FACTOR * self.max_body_bytes:
                break
        return None if too_large else b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then listens to the client (for disconnects)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
