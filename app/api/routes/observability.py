"""`GET /metrics`: Prometheus text for scrapers. No tenant key: it is off with `AMEND_METRICS_ENABLED=false`
(404) and needs `Authorization: Bearer $AMEND_METRICS_TOKEN` when that is set. It holds no tenant names or
ids, only counts by job type, method, outcome, queue and worker."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import SettingsDep
from app.errors import NotFound, Unauthorized

router = APIRouter(tags=["observability"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def prometheus_metrics(request: Request, settings: SettingsDep) -> Response:
    if not settings.metrics_enabled:
        raise NotFound("metrics are disabled")
    token = settings.metrics_token.get_secret_value()
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("/metrics needs the metrics token: 'Authorization: Bearer <AMEND_METRICS_TOKEN>'")
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
