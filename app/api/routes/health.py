"""Liveness and readiness. No authentication."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RecordsDep
from app.errors import ServiceUnavailable
from app.records import redis_errors

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and object storage are reachable")
def readyz(records: RecordsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with redis_errors():
            records.index.ping()
        checks["redis"] = "ok"
    except ServiceUnavailable as error:
        checks["redis"] = error.message
    try:
        records.storage.ping()
        checks["storage"] = "ok"
    except ServiceUnavailable as error:
        checks["storage"] = error.message
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503)
