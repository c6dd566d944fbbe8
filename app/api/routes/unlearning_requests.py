"""Deletion requests: submit (idempotent by content or Idempotency-Key), list, get, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Response
from fastapi import Path as PathParam

from app import documents
from app.api.deps import Reader, RecordsDep, SettingsDep, Writer
from app.deletion import requests as deletion_requests
from app.deletion.schedules import next_runs_by_target
from app.schemas.common import Page
from app.schemas.deletion import (
    RequestState,
    UnlearningRequestCreate,
    UnlearningRequestPublic,
    UnlearningRequestRecord,
)
from app.schemas.jobs import ID_PATTERN

router = APIRouter(prefix="/v1/unlearning-requests", tags=["unlearning requests"])

RequestId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=48)]

def get_request(request_id: RequestId, caller: Reader, records: RecordsDep) -> UnlearningRequestRecord:
    return deletion_requests.get(records, caller.tenant, request_id)

RequestDep = Annotated[UnlearningRequestRecord, Depends(get_request)]

@router.post(
    "", status_code=201, response_model=UnlearningRequestPublic, summary="Ask for rows to be forgotten",
    responses={200: {"model": UnlearningRequestPublic, "description": "The same rows (or key) already asked"}},
)
def create_request(
    spec: Annotated[UnlearningRequestCreate, Body()],
    caller: Writer,
    records: RecordsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> UnlearningRequestPublic:
    record, created = deletion_requests.create(records, caller.tenant, spec, idempotency_key)
    if not created:
        response.status_code = 200
    return deletion_requests.public(record, next_runs_by_target(records, caller.tenant))

@router.get("", response_model=Page[UnlearningRequestPublic], summary="List deletion requests, newest first")
def list_requests(
    caller: Reader,
    records: RecordsDep,
    settings: SettingsDep,
    state: RequestState | None = None,
    target: Annotated[str | None, Query(max_length=48, pattern=ID_PATTERN,
                                        description="A model or adapter id named by the target.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[UnlearningRequestPublic]:
    def keep(record: UnlearningRequestRecord) -> bool:
        return (state is None or record.state == state) and (
            target is None or target in (record.target.model, record.target.adapter)
        )

    items, next_cursor = documents.page(
        records, deletion_requests.KIND, UnlearningRequestRecord, caller.tenant,
        min(limit, settings.page_limit_max), cursor, keep,
    )
    next_runs = next_runs_by_target(records, caller.tenant)
    return Page[UnlearningRequestPublic](
        items=[deletion_requests.public(item, next_runs) for item in items], next_cursor=next_cursor
    )

@router.get("/{request_id}", response_model=UnlearningRequestPublic, summary="Get a deletion request")
def get_one(request: RequestDep, records: RecordsDep) -> UnlearningRequestPublic:
    return deletion_requests.public(request, next_runs_by_target(records, request.tenant))

@router.post("/{request_id}/cancel", response_model=UnlearningRequestPublic,
             summary="Cancel a pending request (409 once scheduled)")
def cancel(request: RequestDep, caller: Writer, records: RecordsDep) -> UnlearningRequestPublic:
    record = deletion_requests.cancel(records, caller.tenant, request.id)
    return deletion_requests.public(record, {})
