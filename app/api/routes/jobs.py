"""Jobs: submit (idempotent), get (ETag), list, cancel, report, events (SSE)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from app import audit
from app.api.deps import CeleryDep, JobDep, Reader, RecordsDep, SettingsDep, Writer
from app.errors import NotFound
from app.jobs import lifecycle
from app.jobs.submit import submit
from app.schemas.common import Page
from app.schemas.jobs import FINAL_STATES, JobCreate, JobPublic, JobState

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
    if not submitted.created:
        response.status_code = 200
    return submitted.job.public()


def _etag(job: JobPublic) -> str:
    return '"' + hashlib.sha256(job.model_dump_json().encode()).hexdigest()[:32] + '"'


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    summary="Get a job (ETag / If-None-Match for cheap polling)",
    responses={304: {"description": "Not modified: If-None-Match matched the job's ETag"}},
)
def get_job(
    job: JobDep, if_none_match: Annotated[str | None, Header(max_length=200)] = None
) -> Response:
    public = job.public()
    etag = _etag(public)
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse(public.model_dump(mode="json"), headers={"ETag": etag, "Cache-Control": "no-cache"})


@router.get("", response_model=Page[JobPublic], summary="List jobs, newest first")
def list_jobs(
    caller: Reader,
    records: RecordsDep,
    state: JobState | None = None,
    type: Annotated[str | None, Query(pattern="^(merge|unlearn|compress)$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[JobPublic]:
    items, next_cursor = records.list_jobs(caller.tenant, limit, cursor, state=state, job_type=type)
    return Page[JobPublic](items=[item.public() for item in items], next_cursor=next_cursor)


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


# one server-sent event: its `data` is JSON with the job's state (and progress and stage for `progress`)
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["progress", "end"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["state"],
                "properties": {
                    "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "progress": {"type": "number", "minimum": 0, "maximum": 1},
                    "stage": {"type": "string"},
                },
            },
        },
    },
}


@router.get(
    "/{job_id}/events",
    summary="Progress as server-sent events until the job finishes",
    response_class=StreamingResponse,
    responses={200: {"description": "`event: progress` and a final `event: end`", "content": {
        "text/event-stream": {"schema": _SSE_EVENT}}}},
)
async def job_events(job: JobDep, records: RecordsDep, request: Request) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        last: tuple[str, float, str] | None = None
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline and not await request.is_disconnected():
            current = await run_in_threadpool(records.get_job, job.id, job.tenant)
            snapshot = (current.state, current.progress, current.stage)
            if snapshot != last:
                last = snapshot
                data = {"state": current.state, "progress": current.progress, "stage": current.stage}
                yield f"event: progress\ndata: {json.dumps(data)}\n\n".encode()
            if current.state in FINAL_STATES:
                yield f"event: end\ndata: {json.dumps({'state': current.state})}\n\n".encode()
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

