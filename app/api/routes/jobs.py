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
from app.errors import Conflict, NotFound, Unprocessable
from app.queue import enqueue
from app.records import Records, add_event, new_id, now
from app.schemas.common import Page
from app.schemas.jobs import FINAL_STATES, JobCreate, JobPublic, JobRecord, JobState, UnlearnJobCreate
from app.schemas.unlearn import UNLEARN_FAMILIES, UNLEARN_PARAMS, missing_inputs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _request_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


# dataset kinds each model family can learn from
_FAMILY_DATASETS = {"causal_lm": {"lm"}, "classifier": {"text_classification", "image_classification"}}


def _check_unlearn_inputs(records: Records, tenant: str, spec: UnlearnJobCreate) -> None:
    """The model, adapter and datasets exist for this tenant and fit the method and each other."""
    model = records.get_resource("models", tenant, spec.model)
    if spec.adapter:
        records.get_adapter(tenant, spec.adapter)
    if model.family not in UNLEARN_FAMILIES[spec.method]:
        raise Unprocessable(
            f"{spec.method} does not support {model.family} models (it supports "
            f"{', '.join(sorted(UNLEARN_FAMILIES[spec.method]))})",
            code="unsupported_family",
        )
    params = UNLEARN_PARAMS[spec.method].model_validate(spec.params)
    provided = {"forget"} | ({"retain"} if spec.retain else set())
    missing = missing_inputs(spec.method, params, provided)
    if missing:
        raise Unprocessable(f"{spec.method} needs {', '.join(missing)} data; the job has none", code="missing_input")
    forget = records.get_resource("datasets", tenant, spec.forget.dataset)
    if spec.forget.rows and spec.forget.rows[-1] >= forget.rows:
        raise Unprocessable(
            f"forget row {spec.forget.rows[-1]} does not exist: dataset {forget.id} has rows 0..{forget.rows - 1}",
            code="invalid_rows",
        )
    for dataset_id in spec.dataset_ids():
        dataset = records.get_resource("datasets", tenant, dataset_id)
        if dataset.kind not in _FAMILY_DATASETS[model.family]:
            raise Unprocessable(
                f"dataset {dataset.id} holds {dataset.kind} rows, which a {model.family} model cannot use",
                code="incompatible_inputs",
            )
        if dataset.kind == "text_classification" and not model.has_tokenizer:
            raise Unprocessable(f"model {model.id} has no tokenizer for text rows", code="incompatible_inputs")
        images = model.architecture.endswith("ForImageClassification")
        if model.family == "classifier" and images != (dataset.kind == "image_classification"):
            raise Unprocessable(
                f"dataset {dataset.id} holds {dataset.kind} rows, which {model.architecture} cannot take",
                code="incompatible_inputs",
            )
        if dataset.num_labels is not None and model.num_labels is not None and dataset.num_labels > model.num_labels:
            raise Unprocessable(
                f"dataset {dataset.id} has {dataset.num_labels} labels, model {model.id} only {model.num_labels}",
                code="incompatible_inputs",
            )
    if model.family == "causal_lm" and not model.has_tokenizer:
        raise Unprocessable(f"model {model.id} has no tokenizer for its text rows", code="incompatible_inputs")


def _check_inputs(records: Records, tenant: str, spec: JobCreate) -> None:
    """Every referenced adapter exists for this tenant, and their base models agree."""
    if isinstance(spec, UnlearnJobCreate):
        _check_unlearn_inputs(records, tenant, spec)
        return
    adapters = [records.get_adapter(tenant, adapter_id) for adapter_id in spec.input_adapter_ids()]
    if not spec.params.get("allow_base_mismatch"):
        bases = {a.base_model for a in adapters if a.base_model}
        if len(bases) > 1:
            raise Unprocessable(
                f"the adapters were trained on different base models {sorted(bases)}; "
                "set params.allow_base_mismatch to merge them anyway",
                code="incompatible_adapters",
            )


def _wait_for_job(records: Records, job_id: str, tenant: str) -> JobRecord:
    """The job holding an idempotency key may be a moment from being written by a concurrent request."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return records.get_job(job_id, tenant)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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
    if len(spec.input_adapter_ids()) > settings.max_merge_adapters:
        raise Unprocessable(f"at most {settings.max_merge_adapters} adapters per merge", code="too_many_adapters")
    spec_dict = spec.model_dump(mode="json", by_alias=True)
    request_hash = _request_hash(spec_dict)
    job_id = new_id("jb")
    if idempotency_key:
        holder = records.claim_idempotency_key(caller.tenant, idempotency_key, job_id)
        if holder is not None:
            existing = _wait_for_job(records, holder, caller.tenant)
            if existing.request_hash != request_hash:
                raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_conflict")
            response.status_code = 200
            return existing.public()
    try:
        _check_inputs(records, caller.tenant, spec)
        records.reserve_job_slot(caller.tenant, job_id, settings.max_jobs_per_tenant)
        record = JobRecord(
            id=job_id,
            tenant=caller.tenant,
            type=spec.type,
            method=spec.method,
            state="queued",
            progress=0.0,
            stage="queued",
            created_at=now(),
            spec=spec_dict,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        add_event(record, "queued")
        records.create_job(record)
    except BaseException:
        records.release_job_slot(caller.tenant, job_id)
        if idempotency_key:
            records.release_idempotency_key(caller.tenant, idempotency_key)
        raise
    enqueue(celery, record.id, record.type)
    return record.public()


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
    def change(record: JobRecord) -> bool:
        if record.state in FINAL_STATES:
            raise Conflict(f"job {record.id} is already {record.state}", code="job_finished")
        record.cancel_requested = True
        if record.state == "queued":
            record.state = "cancelled"
            record.finished_at = now()
            add_event(record, "cancelled before it started")
        else:
            add_event(record, "cancel requested")
        return True

    records.index.set(records.cancel_key(job.id), "1", ex=7 * 24 * 3600)
    return records.mutate_job(job.id, change).public()


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

