"""Schedules: a cron expression (in a time zone), an interval, or one time; each firing submits a job through
`app.jobs.submit.submit`, the same admission as the API.

How they reach celery-redbeat: every schedule is one redbeat entry in Redis (`amend-schedule:{id}`) that fires
once, at the schedule's next slot, with the slot itself in the task's arguments; the task that fires
(`workers.fire_schedule`, on a worker) registers the following slot before anything else. Redbeat keeps the
entries and its lock in Redis, so a restarted beat finds them and two beats cannot both run. Why one entry per
slot and not redbeat's own crontab: redbeat stores a crontab without its zone (cron is read in the beat's zone)
and an rrule with a fixed UTC offset, so neither keeps "03:00 in Europe/Berlin" right across a daylight-saving
change; here the next slot is computed in the schedule's zone (croniter) each time. And the slot travels with
the message, so the idempotency key (schedule id + slot) is the same however many times one slot fires (a
restarted beat, two beats, a redelivered message): one job per slot.

Daylight saving: a cron time that does not exist on the spring-forward day runs at the first minute after
the gap (02:30 → 03:00); a time that exists twice on the fall-back day runs once, at its first occurrence
(for expressions with fixed hours; an hourly `0 * * * *` runs in both hours, as they are distinct hours).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from celery import Celery
from croniter import croniter

from app import documents
from app.deletion import requests as deletion_requests
from app.deletion import versions
from app.errors import Unprocessable
from app.records import PREFIX, Records, new_id, now, redis_errors
from app.schemas.deletion import (
    ScheduleCreate,
    ScheduleRecord,
    ScheduleRun,
    ScheduleUpdate,
    Target,
    Timing,
    UnlearnPendingJob,
)
from app.schemas.jobs import job_create_adapter
from app.settings import Settings

log = logging.getLogger(__name__)
KIND = "schedules"
FIRE_TASK = "workers.fire_schedule"
FIRE_QUEUE = "amend.merge"  # served by every worker (app.queue.queues_for_device); firing only submits
ENTRY_PREFIX = "amend-schedule:"
MAX_RUNS = 20
FIRE_LOCK_SECONDS = 120


# -- timing -----------------------------------------------------------------------------------------


def next_run(timing: Timing, after: datetime, anchor: datetime | None = None) -> datetime | None:
    """The first slot strictly after `after` (UTC), or None when there is none (a one-off already past)."""
    if timing.run_at is not None:
        return timing.run_at.astimezone(UTC) if timing.run_at > after else None
    if timing.interval_seconds is not None:
        start = anchor or after
        periods = int((after - start).total_seconds() // timing.interval_seconds) + 1
        return (start + timedelta(seconds=periods * timing.interval_seconds)).astimezone(UTC)
    assert timing.cron is not None  # noqa: S101 - Timing.check_one guarantees one of the three
    zone = ZoneInfo(timing.timezone)
    local = after.astimezone(zone)
    fixed_hours = timing.cron.split()[1] != "*"
    it = croniter(timing.cron, local)
    candidate: datetime = it.get_next(datetime)
    # fall-back day: the same wall time again (with the later offset) is the repeat of a slot already taken
    while fixed_hours and _is_second_occurrence(candidate, zone):
        candidate = it.get_next(datetime)
    return candidate.astimezone(UTC)


def _is_second_occurrence(moment: datetime, zone: ZoneInfo) -> bool:
    wall = moment.replace(tzinfo=None)
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    return first.utcoffset() != second.utcoffset() and moment.utcoffset() == second.utcoffset()


# -- redbeat entries ---------------------------------------------------------------------------------


def entry_name(schedule_id: str) -> str:
    return ENTRY_PREFIX + schedule_id


def register(celery: Celery, record: ScheduleRecord) -> None:
    """Point the schedule's redbeat entry at its next slot (or remove it: paused, or no slot left)."""
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedules import rrule

    unregister(celery, record.id)
    if record.paused or record.next_run_at is None:
        return
    slot = record.next_run_at.astimezone(UTC)
    entry = RedBeatSchedulerEntry(
        entry_name(record.id), FIRE_TASK, rrule("SECONDLY", dtstart=slot, count=1, app=celery),
        args=[record.tenant, record.id, slot.isoformat()], options={"queue": FIRE_QUEUE}, app=celery,
    )
    # redbeat files the entry as due at last_run_at + (next occurrence − now): last_run_at must be now for that
    # to be the slot (slot − 1 s put a slot 10 minutes ahead at 20 minutes); a slot already past (a beat that
    # was down) keeps one occurrence after last_run_at, so it is overdue and due at once
    entry.last_run_at = min(datetime.now(UTC), slot - timedelta(seconds=1))
    with redis_errors():
        entry.save()


def unregister(celery: Celery, schedule_id: str) -> None:
    from redbeat import RedBeatSchedulerEntry

    entry = RedBeatSchedulerEntry(entry_name(schedule_id), FIRE_TASK, None, app=celery)
    with redis_errors():
        entry.delete()


def registered_slot(celery: Celery, schedule_id: str) -> datetime | None:
    """The slot the schedule's redbeat entry will fire (None: no entry)."""
    from redbeat import RedBeatSchedulerEntry

    try:
        entry = RedBeatSchedulerEntry.from_key(
            RedBeatSchedulerEntry.generate_key(celery, entry_name(schedule_id)), app=celery
        )
    except KeyError:
        return None
    return datetime.fromisoformat(entry.args[2])


# -- records ----------------------------------------------------------------------------------------


def get(records: Records, tenant: str, schedule_id: str) -> ScheduleRecord:
    return documents.get(records, KIND, ScheduleRecord, tenant, schedule_id)


def _check_job(records: Records, settings: Settings, tenant: str, job: Any) -> None:
    """The job's inputs exist for this tenant now (the same admission checks, run again at each firing)."""
    from app.jobs.submit import ADMISSION_CHECKS

    if isinstance(job, UnlearnPendingJob):
        records.get_resource("models", tenant, job.target.model)
        if job.target.adapter:
            records.get_adapter(tenant, job.target.adapter)
        for dataset in (job.retain, job.eval_):
            if dataset:
                records.get_resource("datasets", tenant, dataset)
        return
    ADMISSION_CHECKS[job.type](records, settings, tenant, job)


def create(records: Records, settings: Settings, celery: Celery, tenant: str, spec: ScheduleCreate) -> ScheduleRecord:
    _check_job(records, settings, tenant, spec.job)
    stamp = now()
    record = ScheduleRecord(
        id=new_id("sc"), tenant=tenant, name=spec.name, cron=spec.cron, interval_seconds=spec.interval_seconds,
        run_at=spec.run_at, timezone=spec.timezone, paused=spec.paused,
        job=spec.job.model_dump(mode="json", by_alias=True), created_at=stamp, anchor=stamp,
    )
    record.next_run_at = next_run(record.timing(), stamp, record.anchor)
    documents.put(records, KIND, record)
    register(celery, record)
    return record


def update(records: Records, celery: Celery, tenant: str, schedule_id: str, change: ScheduleUpdate) -> ScheduleRecord:
    given = change.model_dump(exclude_unset=True)
    timing_fields = {"cron", "interval_seconds", "run_at"} & set(given)
    if len(timing_fields) > 1:
        raise Unprocessable("give at most one of cron, interval_seconds, run_at")

    def apply(record: ScheduleRecord) -> bool:
        if timing_fields:
            field = next(iter(timing_fields))
            record.cron = record.interval_seconds = record.run_at = None
            setattr(record, field, given[field])
        if change.timezone is not None:
            record.timezone = change.timezone
        try:
            timing = Timing.model_validate(record.timing().model_dump())
            timing.check_one()
        except ValueError as error:
            raise Unprocessable(str(error)) from None
        if change.name is not None:
            record.name = change.name
        if change.paused is not None:
            record.paused = change.paused
        stamp = now()
        if "interval_seconds" in given:
            record.anchor = stamp
        record.next_run_at = None if record.paused else next_run(timing, stamp, record.anchor)
        return True

    record = documents.mutate(records, KIND, ScheduleRecord, tenant, schedule_id, apply)
    register(celery, record)
    return record


def delete(records: Records, celery: Celery, tenant: str, schedule_id: str) -> None:
    get(records, tenant, schedule_id)
    unregister(celery, schedule_id)
    documents.delete(records, KIND, tenant, schedule_id)


def next_runs_by_target(records: Records, tenant: str) -> dict[str, datetime]:
    """The earliest next run of an active `unlearn_pending` schedule per target key."""
    found: dict[str, datetime] = {}
    for schedule in documents.all_of(records, KIND, ScheduleRecord, tenant):
        if schedule.paused or schedule.next_run_at is None or schedule.job.get("type") != "unlearn_pending":
            continue
        target = UnlearnPendingJob.model_validate(schedule.job).target.key()
        if target not in found or schedule.next_run_at < found[target]:
            found[target] = schedule.next_run_at
    return found


# -- firing -----------------------------------------------------------------------------------------


def fire(
    records: Records, settings: Settings, celery: Celery, tenant: str, schedule_id: str, slot: datetime
) -> ScheduleRun | None:
    """Run the schedule's slot: register the next slot, then submit its job (or record a skipped run). The
    same slot again does nothing and returns None (a run for it exists, or another firing holds it)."""
    from app.errors import NotFound

    try:
        schedule = get(records, tenant, schedule_id)
    except NotFound:
        return None  # deleted since the entry fired
    if any(run.slot == slot for run in schedule.runs):
        return None
    with redis_errors():
        if not records.index.set(f"{PREFIX}fire:{schedule_id}:{slot.isoformat()}", "1", nx=True,
                                 ex=FIRE_LOCK_SECONDS):
            return None

    following = next_run(schedule.timing(), max(slot, now()), schedule.anchor)

    def advance(record: ScheduleRecord) -> bool:
        record.next_run_at = None if record.paused else following
        return True

    schedule = documents.mutate(records, KIND, ScheduleRecord, tenant, schedule_id, advance)
    register(celery, schedule)

    run = ScheduleRun(slot=slot, time=now())
    if schedule.paused:
        run.skipped = "paused"
    else:
        try:
            _run_job(records, settings, celery, schedule, slot, run)
        except Exception as error:  # noqa: BLE001 - the run records why it submitted nothing
            log.warning("schedule run failed", extra={"schedule_id": schedule_id, "error": str(error)})
            run.error = getattr(error, "message", None) or f"{type(error).__name__}: {error}"

    def remember(record: ScheduleRecord) -> bool:
        record.runs = [run, *[r for r in record.runs if r.slot != slot]][:MAX_RUNS]
        return True

    documents.mutate(records, KIND, ScheduleRecord, tenant, schedule_id, remember)
    return run


def idempotency_key(schedule_id: str, slot: datetime) -> str:
    return f"{schedule_key_prefix(schedule_id)}{slot.astimezone(UTC).isoformat()}"


def schedule_key_prefix(schedule_id: str) -> str:
    """How every idempotency key of a schedule's jobs begins (`GET /v1/jobs?schedule=` finds them by it)."""
    return f"schedule:{schedule_id}:"


def _run_job(
    records: Records, settings: Settings, celery: Celery, schedule: ScheduleRecord, slot: datetime, run: ScheduleRun
) -> None:
    from app.jobs.submit import submit

    key = idempotency_key(schedule.id, slot)
    if schedule.job.get("type") != "unlearn_pending":
        spec = job_create_adapter.validate_python(schedule.job)
        run.job_id = submit(records, settings, celery, schedule.tenant, spec, idempotency_key=key).job.id
        return
    pending_job = UnlearnPendingJob.model_validate(schedule.job)
    claimed = deletion_requests.claim(records, schedule.tenant, pending_job.target.key(), schedule.id, key)
    if not claimed:
        run.skipped = "nothing pending"
        return
    rows = sorted({row for request in claimed for row in request.rows})
    current = versions.current(records, schedule.tenant, pending_job.target)
    source = Target(model=current.model_id, adapter=current.adapter_id)
    spec = pending_job.unlearn_job(claimed[0].dataset, rows, [request.id for request in claimed], source)
    ids = [request.id for request in claimed]
    try:
        submitted = submit(records, settings, celery, schedule.tenant, spec, idempotency_key=key)
    except BaseException:
        deletion_requests.release(records, schedule.tenant, ids, key)
        raise
    run.job_id, run.requests = submitted.job.id, ids
    deletion_requests.attach_job(records, schedule.tenant, ids, submitted.job.id, key)


def reindex(records: Records, celery: Celery, found: list[tuple[str, dict[str, Any]]]) -> int:
    """Re-register every schedule's redbeat entry (at its next slot from now, when the stored one has passed
    unfired: it fires once at once, as a beat that was down would)."""
    for _tenant, data in found:
        record = ScheduleRecord.model_validate(data)
        register(celery, record)
    return len(found)
