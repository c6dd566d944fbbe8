"""Limits enforced before or while a request body streams in.

- `BodySizeLimit`: 413 before the body is read when Content-Length is too big, and 413 as soon as a chunked
  body passes the limit. Only multipart uploads may be large (`max_bytes`, or the route's own entry in
  `path_limits`, e.g. model archives); any other body (JSON, parsed whole in memory) is held to
  `max_other_bytes`.
- `KeyBeforeBody`: a request that may carry a body (POST, PUT, PATCH, DELETE) without a valid API key is 401
  before any of its body is read. FastAPI parses form and JSON bodies before it runs the auth dependency, so
  without this an unauthenticated client could make the service spool a whole upload to disk. Likewise a
  request that does carry a body (Content-Length > 0 or Transfer-Encoding) from a key without the `write`
  scope is 403 before it is read: every route that takes a body writes.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import authenticate
from app.errors import Unauthorized
from app.settings import ApiKey

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# a job spec at its schema's limits (64 adapters, 4096 rank_pattern keys, 100k forget rows) is ~2 MiB
MAX_OTHER_BODY_BYTES = 4 * 2**20


class _TooLarge(HTTPException):
    """An HTTPException, so body parsers pass it through unchanged instead of turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodySizeLimit:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        max_other_bytes: int = MAX_OTHER_BODY_BYTES,
        path_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_other_bytes = max_other_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        upload_limit = self.path_limits.get(scope["path"], self.max_bytes)
        limit = upload_limit if multipart else min(upload_limit, self.max_other_bytes)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = True
            if too_big:
                await self._refuse(send, limit)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
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
                await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        await _send_error(send, 413, "payload_too_large", f"request body exceeds {limit} bytes")


class KeyBeforeBody:
    def __init__(self, app: ASGIApp, api_keys: dict[str, ApiKey]) -> None:
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS:
            authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            try:
                caller = authenticate(authorization, self.api_keys)
            except Unauthorized as error:
                await _send_error(send, 401, error.code, error.message, [(b"www-authenticate", b"Bearer")])
                return
            if _has_body(scope) and not caller.scopes & {"write", "admin"}:
                await _send_error(send, 403, "forbidden", "this API key lacks the 'write' scope")
                return
        await self.app(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() not in (b"0", b"")


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
