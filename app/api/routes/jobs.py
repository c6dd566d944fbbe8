"""Jobs: submit (idempotent), get (ETag), list, cancel, report, events (SSE)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app import audit, logs
from app.api.deps import CeleryDep, JobDep, Reader, RecordsDep, SettingsDep, Writer
from app.deletion.schedules import schedule_key_prefix
from app.errors import IndexUnavailable, NotFound, Unprocessable
from app.jobs import lifecycle
from app.jobs.submit import submit
from app.records import Records, as_text
from app.schemas.common import Page
from app.schemas.events import EventPage, JobEventPublic
from app.schemas.jobs import FINAL_STATES, ID_PATTERN, JobCreate, JobPublic, JobRecord, JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit a job",
    responses={200: {"model": JobPublic, "description": "The job already created with this Idempotency-Key"}},
)
def create_job(
    spec: Annotated[JobCreate, Body()],
    caller: Writer,
    records: RecordsDep,
    settings: SettingsDep,
    celery: CeleryDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    submitted = submit(records, settings, celery, caller.tenant, spec, idempotency_key)
    logs.bind(job_id=submitted.job.id)
    if not submitted.created:
        response.status_code = 200
    return submitted.job.public()


def conditional(body: bytes, if_none_match: str | None) -> Response:
    """The JSON body with a strong ETag of its bytes; 304 without a body when the client already has them."""
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return not_modified(etag, if_none_match) or tagged(body, etag)


def not_modified(etag: str, if_none_match: str | None) -> Response | None:
    """304 without a body when `If-None-Match` names `etag`, else None."""
    if if_none_match is not None and etag in (tag.strip() for tag in if_none_match.split(",")):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
    return None


def tagged(body: bytes, etag: str) -> Response:
    return Response(body, media_type="application/json", headers={"ETag": etag, "Cache-Control": "no-cache"})


IfNoneMatch = Annotated[str | None, Header(max_length=1024)]
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {"description": "Not modified: If-None-Match matched the ETag"}}


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job (ETag / If-None-Match for cheap polling)",
            responses=_NOT_MODIFIED)
async def get_job(job: JobDep, if_none_match: IfNoneMatch = None) -> Response:  # CPU only: no threadpool hop
    return conditional(public_json(job), if_none_match)


_PUBLIC_FIELDS = set(JobPublic.model_fields)


def public_json(job: JobRecord) -> bytes:
    """The JobPublic JSON of a record, dumped straight from it (the same bytes as `job.public()`'s, without
    building the second model)."""
    return job.model_dump_json(include=_PUBLIC_FIELDS).encode()


async def _jobs_version(request: Request, records: Records, tenant: str) -> str:
    """The tenant's job-list version: one GET on the event loop's Redis client (the threadpool when there is
    none, or when the version must first be made)."""
    index = getattr(request.app.state, "aindex", None)
    if index is not None:
        try:
            version = await index.get(records.jobs_version_key(tenant))
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise IndexUnavailable("the Redis index is unavailable; retry shortly") from error
        if version is not None:
            return as_text(version)
    return await run_in_threadpool(records.jobs_version, tenant)


def list_etag(tenant: str, version: str, query: dict[str, Any]) -> str:
    """A list's ETag: the tenant, its job-list version (`Records.jobs_version_key`) and the query as parsed,
    so another filter, page or size has another tag and any write to the tenant's jobs makes every old one
    stale."""
    text = json.dumps([tenant, version, query], sort_keys=True, default=str)
    return '"l' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


@router.get("", response_model=Page[JobPublic], summary="List jobs, newest first (ETag / If-None-Match)",
            responses=_NOT_MODIFIED)
async def list_jobs(
    request: Request,
    caller: Reader,
    records: RecordsDep,
    state: JobState | None = None,
    type: Annotated[str | None, Query(pattern="^(merge|unlearn|compress)$")] = None,
    method: Annotated[str | None, Query(max_length=64, pattern="^[a-z0-9_]+$")] = None,
    adapter: Annotated[str | None, Query(pattern=ID_PATTERN, max_length=48,
                                         description="Jobs that read this adapter or produced it.")] = None,
    created_after: Annotated[datetime | None, Query(description="Exclusive; ISO 8601 with a time zone.")] = None,
    created_before: Annotated[datetime | None, Query(description="Exclusive; ISO 8601 with a time zone.")] = None,
    schedule: Annotated[str | None, Query(max_length=64, description="Jobs this schedule submitted (its runs' "
                                          "jobs; not the rebuilds a promotion starts).")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    for bound in (created_after, created_before):
        if bound is not None and bound.tzinfo is None:
            raise Unprocessable("created_after and created_before need a time zone (e.g. 2026-01-01T00:00:00Z)")
    # the version is read before the list: a write in between makes the next poll's tag differ, never hides it
    query: dict[str, Any] = {
        "state": state, "type": type, "method": method, "adapter": adapter, "schedule": schedule,
        "created_after": created_after, "created_before": created_before, "limit": limit, "cursor": cursor}
    etag = list_etag(caller.tenant, await _jobs_version(request, records, caller.tenant), query)
    cached = not_modified(etag, if_none_match)
    if cached is not None:
        return cached
    return tagged(await run_in_threadpool(_page_body, records, caller.tenant, **query), etag)


def _page_body(
    records: Records, tenant: str, *, state: JobState | None, type: str | None, method: str | None,
    adapter: str | None, schedule: str | None, created_after: datetime | None, created_before: datetime | None,
    limit: int, cursor: str | None,
) -> bytes:
    """The Page[JobPublic] JSON of one page of the tenant's jobs."""

    def keep(record: JobRecord) -> bool:
        if method and record.method != method:
            return False
        if adapter and adapter not in record.input_adapter_ids() and not _produced(record, adapter):
            return False
        if schedule and not (record.idempotency_key or "").startswith(schedule_key_prefix(schedule)):
            return False
        return True

    items: list[JobRecord] = []
    next_cursor: str | None = None
    items, next_cursor = records.list_jobs(
        tenant, limit, cursor, state=state, job_type=type, keep=keep if method or adapter or schedule else None,
        created_after=created_after, created_before=created_before,
    )
    # the Page[JobPublic] JSON, each item dumped straight from its record (no second model per job)
    body = b'{"items":[' + b",".join(public_json(item) for item in items) + b'],"next_cursor":'
    return body + json.dumps(next_cursor).encode() + b"}"


def _produced(record: JobRecord, adapter_id: str) -> bool:
    result = record.result
    return result is not None and (result.adapter_id == adapter_id or adapter_id in result.adapter_ids)


@router.post("/{job_id}/cancel", response_model=JobPublic, summary="Cancel a queued or running job")
def cancel_job(job: JobDep, caller: Writer, records: RecordsDep) -> JobPublic:
    return lifecycle.cancel(records, job.id).public()


@router.get("/{job_id}/report", summary="The job's full report (merge quality, unlearning metrics)")
def get_report(job: JobDep, records: RecordsDep) -> Any:
    if not job.result or not job.result.report_key:
        raise NotFound(f"job {job.id} has no report yet")
    return records.storage.get_json(job.result.report_key)


@router.get("/{job_id}/audit", summary="An unlearning job's signed audit record, with the signature verified")
def get_audit(job: JobDep, records: RecordsDep, settings: SettingsDep) -> Any:
    if not job.result or not job.result.audit_key:
        raise NotFound(f"job {job.id} has no audit record")
    record = records.storage.get_json(job.result.audit_key)
    valid = audit.verify(record, settings.audit_hmac_key.get_secret_value())
    return {**record, "signature_valid": valid}


# one server-sent event: its `data` is JSON
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "description": "`event` only: the log entry's id (send it back as Last-Event-ID)"},
        "event": {"enum": ["event", "progress", "end"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["state"],
                "properties": {
                    "id": {"type": "string"},
                    "time": {"type": "string", "format": "date-time"},
                    "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "progress": {"type": "number", "minimum": 0, "maximum": 1},
                    "stage": {"type": "string"},
                },
            },
        },
    },
}


def _event_log(job: JobRecord) -> list[JobEventPublic]:
    """The job's log with stable ids: the event's time in microseconds (made unique within the job), so a
    client resumes after the last id it saw even when old entries have been trimmed."""
    items: list[JobEventPublic] = []
    previous = 0
    for event in job.events:
        number = max(int(event.time.timestamp() * 1e6), previous + 1)
        previous = number
        items.append(JobEventPublic(id=str(number), **event.model_dump()))
    return items


def _after(items: list[JobEventPublic], last_id: str | None) -> list[JobEventPublic]:
    if not last_id or not last_id.isdigit():
        return items
    return [item for item in items if int(item.id) > int(last_id)]


@router.get(
    "/{job_id}/events",
    response_model=EventPage,
    summary="The job's event log: JSON, or with `Accept: text/event-stream` a stream until the job ends",
    responses={200: {"description": "JSON `{items, state}`; as server-sent events: each log entry as "
                     "`event: event` with its `id`, live `event: progress` snapshots, and a final `event: end`. "
                     "`Last-Event-ID` (or `?after=`) resumes after that entry.",
                     "content": {"text/event-stream": {"schema": _SSE_EVENT}}}},
)
async def job_events(
    job: JobDep,
    records: RecordsDep,
    request: Request,
    after: Annotated[str | None, Query(max_length=32, pattern="^[0-9]+$")] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> Response:
    since = last_event_id or after
    if "text/event-stream" not in request.headers.get("accept", ""):
        page = EventPage(items=_after(_event_log(job), since), state=job.state)
        return Response(page.model_dump_json().encode(), media_type="application/json")

    async def stream() -> AsyncIterator[bytes]:
        cursor = since
        last: tuple[str, float, str] | None = None
        deadline = time.monotonic() + 3600
        current = job
        while time.monotonic() < deadline and not await request.is_disconnected():
            for item in _after(_event_log(current), cursor):
                cursor = item.id
                yield f"id: {item.id}\nevent: event\ndata: {item.model_dump_json()}\n\n".encode()
            snapshot = (current.state, current.progress, current.stage)
            if snapshot != last:
                last = snapshot
                data = {"state": current.state, "progress": current.progress, "stage": current.stage}
                yield f"event: progress\ndata: {json.dumps(data)}\n\n".encode()
            if current.state in FINAL_STATES:
                yield f"event: end\ndata: {json.dumps({'state': current.state})}\n\n".encode()
                return
            await asyncio.sleep(0.5)
            current = await run_in_threadpool(records.get_job, job.id, job.tenant)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
