"""Structured JSON logs. Secrets never reach them: settings hold secrets as SecretStr, and nothing logs a
request's headers."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# what every line of the current request or job carries: request_id, tenant, job_id. One dict per request or
# job, changed in place by `bind`, so a value bound in a threadpool dependency shows in the route's lines too.
_context: ContextVar[dict[str, str] | None] = ContextVar("amend_log_context", default=None)
REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
access_log = logging.getLogger("amend.access")


@contextmanager
def context(**values: str | None) -> Iterator[dict[str, str]]:
    """A fresh log context (for one request or one job) holding `values`."""
    current = {key: value for key, value in values.items() if value}
    token = _context.set(current)
    try:
        yield current
    finally:
        _context.reset(token)


def current(name: str) -> str | None:
    """A value of the current request's or job's log context (`request_id`, `tenant`, `job_id`), or None."""
    return (_context.get() or {}).get(name)


def bind(**values: str | None) -> None:
    """Add `values` to the current request's or job's log context (no-op outside one)."""
    current = _context.get()
    if current is not None:
        current.update({key: value for key, value in values.items() if value})


# the job context a job's message carries in its `kwargsrepr` (`app.queue.enqueue`)
_RECEIVED_KEYS = ("job_id", "tenant", "request_id")


def _received_context(record: logging.LogRecord) -> dict[str, str]:
    """Celery's "received" line (logger `celery.worker.strategy`, its context in `record.data`) is written by
    the worker's main process before any job context exists: its job context comes from the message's
    `kwargsrepr`. Anything else, or a kwargsrepr that is not that JSON, adds nothing."""
    data = getattr(record, "data", None)
    if record.name != "celery.worker.strategy" or not isinstance(data, dict):
        return {}
    try:
        carried = json.loads(str(data.get("kwargs") or ""))
    except ValueError:
        return {}
    if not isinstance(carried, dict):
        return {}
    return {key: str(carried[key]) for key in _RECEIVED_KEYS if isinstance(carried.get(key), str)}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context.get() or {})
        entry.update(_received_context(record))
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RequestContext:
    """Gives every request an id (the client's `X-Request-ID` when it is a sane token, else a new one), returns
    it in the `X-Request-ID` response header, and puts it — with the tenant and job id the dependencies bind —
    on every log line of the request. One access line per request: DEBUG when it went well, INFO for errors
    and requests slower than a second (a line per poll at thousands per second would cost more than the poll)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _VALID_REQUEST_ID.match(given) else "req_" + secrets.token_hex(8)
        started, status = time.perf_counter(), [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        with context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                seconds = time.perf_counter() - started
                level = logging.INFO if status[0] >= 400 or seconds > 1.0 else logging.DEBUG
                if access_log.isEnabledFor(level):
                    route = getattr(scope.get("route"), "path", None) or scope["path"]
                    access_log.log(level, "request", extra={
                        "method": scope["method"], "route": route, "status": status[0],
                        "duration_ms": round(1000 * seconds, 2)})
