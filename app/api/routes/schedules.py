"""Schedules: create, change (pause/resume, timing), delete, list, get with the next run and the last runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query
from fastapi import Path as PathParam

from app import documents
from app.api.deps import CeleryDep, Reader, RecordsDep, SettingsDep, Writer
from app.deletion import schedules
from app.schemas.common import Page
from app.schemas.deletion import ScheduleCreate, SchedulePublic, ScheduleRecord, ScheduleUpdate
from app.schemas.jobs import ID_PATTERN

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

ScheduleId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=48)]


def get_schedule(schedule_id: ScheduleId, caller: Reader, records: RecordsDep) -> ScheduleRecord:
    return schedules.get(records, caller.tenant, schedule_id)


ScheduleDep = Annotated[ScheduleRecord, Depends(get_schedule)]


@router.post("", status_code=201, response_model=SchedulePublic, summary="Create a schedule")
def create_schedule(
    spec: Annotated[ScheduleCreate, Body()], caller: Writer, records: RecordsDep, settings: SettingsDep,
    celery: CeleryDep,
) -> SchedulePublic:
    return schedules.create(records, settings, celery, caller.tenant, spec).public()


@router.get("", response_model=Page[SchedulePublic], summary="List schedules, newest first")
def list_schedules(
    caller: Reader, records: RecordsDep, settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[SchedulePublic]:
    items, next_cursor = documents.page(
        records, schedules.KIND, ScheduleRecord, caller.tenant, min(limit, settings.page_limit_max), cursor
    )
    return Page[SchedulePublic](items=[item.public() for item in items], next_cursor=next_cursor)


@router.get("/{schedule_id}", response_model=SchedulePublic, summary="Get a schedule: next run, last runs")
def get_one(schedule: ScheduleDep) -> SchedulePublic:
    return schedule.public()


@router.patch("/{schedule_id}", response_model=SchedulePublic, summary="Pause, resume, rename or retime")
def update_schedule(
    schedule: ScheduleDep, change: Annotated[ScheduleUpdate, Body()], caller: Writer, records: RecordsDep,
    celery: CeleryDep,
) -> SchedulePublic:
    return schedules.update(records, celery, caller.tenant, schedule.id, change).public()


@router.delete("/{schedule_id}", status_code=204, summary="Delete a schedule (its beat entry too)")
def delete_schedule(schedule: ScheduleDep, caller: Writer, records: RecordsDep, celery: CeleryDep) -> None:
    schedules.delete(records, celery, caller.tenant, schedule.id)
