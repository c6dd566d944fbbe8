"""create_app(): settings, services, routers, one exception handler for every typed error."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import logs, metrics, webhooks
from app.api.fastpath import JobPollFastPath
from app.api.routes import adapters, datasets, health, jobs, models, schedules, stats, unlearning_requests, versions
from app.api.routes import uploads as upload_routes
from app.api.routes import webhooks as webhook_routes
from app.api.routes.observability import router as observability_router
from app.api.routes.ui import router as ui_router
from app.errors import AmendError
from app.jobs import hooks
from app.limits import BodySizeLimit, KeyBeforeBody
from app.queue import make_celery
from app.records import Records
from app.reindex import reindex_and_requeue
from app.schemas.common import ErrorBody
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)
# The errors every /v1 route may answer, documented once in the OpenAPI spec with the one error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Invalid upload (adapter, model or dataset) or unparsable body",
        401: "Missing or invalid API key",
        403: "The API key lacks the scope",
        404: "Not found, or another tenant's",
        409: "Conflict: in use, idempotency key reused, job already finished",
        413: "Request body or file too large",
        415: "Unsupported media type (pickle checkpoints are refused)",
        422: "Invalid request",
        429: "Tenant quota exceeded",
        503: "Redis or object storage unavailable; retry",
    }.items()
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            app.state.records.storage.ensure_bucket()
            if app.state.records.is_index_empty():
                counts = reindex_and_requeue(app.state.records, app.state.celery)
                log.info("rebuilt the Redis index from storage", extra=counts)
        except Exception as error:  # noqa: BLE001 - start anyway; /readyz reports what is down
            log.warning("start-up checks failed", extra={"error": str(error)})
        sender = webhooks.Sender(app.state.records, app.state.settings)
        sender.start()
        # an asyncio Redis client for the polling hot path (api/deps.get_job), made on the server's own loop
        aindex = redis.asyncio.Redis.from_url(
            app.state.settings.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
        app.state.aindex = aindex
        try:
            yield
        finally:
            sender.stop()
            if getattr(app.state, "aindex", None) is aindex:
                app.state.aindex = None  # requests fall back to the threadpool path
            await aindex.aclose()

    app = FastAPI(
        title="Amend",
        version="0.1.0",
        description="Merge, compress and unlearn LoRA adapters. Every route but health needs "
        "`Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.api_keys = settings.parsed_api_keys()
    # the app keeps only the keys' digests: its settings copy names each key by `sha256:<hex>`, never raw
    hashed = ",".join(
        f"sha256:{key.digest}:{key.tenant}:{'+'.join(sorted(key.scopes))}" for key in app.state.api_keys.values()
    )
    app.state.settings = settings = settings.model_copy(update={"api_keys": SecretStr(hashed)})
    app.state.records = Records.connect(settings)
    app.state.celery = make_celery(settings, "amend-api")
    app.state.metrics = metrics.ApiMetrics(app.state.records.index)
    hooks.install(app.state.records, settings)

    @app.exception_handler(AmendError)
    async def amend_error(request: Request, error: AmendError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        if error.status == 503:
            headers = {"Retry-After": "5"}
            backend = metrics.backend_of(error)
            if backend:
                app.state.metrics.backend_errors.labels(backend).inc()
        return _error(error.status, error.code, error.message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()[:10]
        )
        return _error(422, "validation_error", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, "http_error")
        return _error(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, error: redis.RedisError) -> JSONResponse:
        app.state.metrics.backend_errors.labels("redis").inc()
        return _error(503, "redis_unavailable", "the Redis index is unavailable; retry shortly", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return _error(500, "internal_error", "internal error")

    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_upload_bytes + settings.max_config_bytes + (1 << 20),
        path_limits={"/v1/models": settings.max_model_archive_bytes + (1 << 20)},  # a model tar has its own limit
    )
    app.add_middleware(KeyBeforeBody, api_keys=app.state.api_keys)  # no key, no body read
    app.add_middleware(JobPollFastPath, state=app.state)  # a plain job poll without the router (api/fastpath.py)
    app.add_middleware(metrics.LatencyMiddleware, metrics=app.state.metrics)  # times everything below
    app.add_middleware(logs.RequestContext)  # outermost: a request id on every line and response
    app.include_router(health.router)
    app.include_router(observability_router)
    app.include_router(ui_router)
    app.include_router(webhook_routes.router, responses=ERROR_RESPONSES)
    for router in (adapters.router, jobs.router, models.router, datasets.router, stats.router,
                   unlearning_requests.router, schedules.router, versions.router, upload_routes.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    return app
