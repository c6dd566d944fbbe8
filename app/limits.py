"""Limits enforced before or while a request body streams in.

- `BodySizeLimit`: 413 before the body is read when Content-Length is too big, and 413 as soon as a chunked
  body passes the limit.
- `KeyBeforeBody`: a request that may carry a body (POST, PUT, PATCH, DELETE) without a valid API key is 401
  before any of its body is read. FastAPI parses form and JSON bodies before it runs the auth dependency, so
  without this an unauthenticated client could make the service spool a whole upload to disk.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import authenticate
from app.errors import Unauthorized
from app.settings import ApiKey

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _TooLarge(HTTPException):
    """An HTTPException, so body parsers pass it through unchanged instead of turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = True
            if too_big:
                await self._refuse(send)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await _send_error(send, 413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")


class KeyBeforeBody:
    def __init__(self, app: ASGIApp, api_keys: dict[str, ApiKey]) -> None:
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS:
            authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            try:
                authenticate(authorization, self.api_keys)
            except Unauthorized as error:
                await _send_error(send, 401, error.code, error.message, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


async def _send_error(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """The one error shape, sent straight from a middleware."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
