"""The polling fast path: `GET /v1/jobs/{id}` answered before FastAPI's router and dependency solving.

Dashboards poll one job all day, and a profile of that request (server CPU per request, in-process, measured
with `bench/poll_bench.py`'s companion profile) put FastAPI's route matching and dependency solving at about half
of it, more than the Redis round trip, the record's validation and its serialisation together. This ASGI
middleware answers only the plain case — a readable key, no query string, a job present in the Redis index
that belongs to the caller — with exactly what the route answers (the same body, strong ETag, 304 to
`If-None-Match`, Cache-Control), using the same pieces: `deps.authenticate`, `Records.job_from_index`,
`routes.jobs.conditional` and `public_json`. Anything else (no or bad key, missing scope, another tenant's or
an unknown id, a job only in storage, Redis trouble) falls through to the route, which gives the usual answer
or error. Measured in-process (server CPU per request): hello-world 116 us; the job through the router 306 us,
through this path 134 us.
"""

from __future__ import annotations

import re
from typing import Any

import redis
from starlette.types import ASGIApp, Receive, Scope, Send

from app import logs
from app.api.deps import authenticate
from app.api.routes.jobs import conditional, public_json
from app.api.routes.jobs import router as jobs_router
from app.errors import AmendError
from app.schemas.jobs import JobRecord

_JOB_PATH = re.compile(r"^/v1/jobs/(jb_[0-9a-f]{24})$")
_ROUTE = next(r for r in jobs_router.routes if getattr(r, "path", "") == "/v1/jobs/{job_id}"
              and "GET" in getattr(r, "methods", ()))


class JobPollFastPath:
    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app, self.app_state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _JOB_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "GET" else None
        if match is None or scope.get("query_string") or getattr(self.app_state, "aindex", None) is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            caller = authenticate(headers.get(b"authorization", b"").decode("latin-1"), self.app_state.api_keys)
            if not caller.scopes & {"read", "admin"}:
                raise PermissionError
            records = self.app_state.records
            raw, progress = await self.app_state.aindex.mget(*records.job_keys(match.group(1)))
            if raw is None:
                raise LookupError
            job = records.job_from_index(match.group(1), JobRecord.model_validate_json(raw), progress, caller.tenant)
        except (AmendError, PermissionError, LookupError, redis.RedisError, ValueError):
            await self.app(scope, receive, send)  # the route answers, or refuses, as it always does
            return
        logs.bind(tenant=caller.tenant, job_id=job.id)
        scope["route"] = _ROUTE  # so latency metrics and the access log name the template
        if_none_match = headers.get(b"if-none-match")
        response = conditional(public_json(job), if_none_match.decode("latin-1") if if_none_match else None)
        await response(scope, receive, send)
