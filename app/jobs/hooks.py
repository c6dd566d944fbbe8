"""The listeners every process that changes job states registers with `lifecycle.on_change`: metrics (and,
below them, webhooks). `install` is called once by the API (`create_app`) and once by each worker process
(`workers.jobs.context.services`); calling it again points the listeners at the newest Redis client instead
of adding a second copy."""

from __future__ import annotations

from app import metrics
from app.jobs import lifecycle
from app.records import Records
from app.schemas.jobs import JobRecord, JobState
from app.settings import Settings

_current: dict[str, Records] = {}


def _count(record: JobRecord, previous: JobState | None) -> None:
    records = _current.get("records")
    if records is not None:
        metrics.record_transition(records.index, record, previous)


def install(records: Records, settings: Settings) -> None:
    if not _current:
        lifecycle.on_change(_count)
    _current["records"] = records
