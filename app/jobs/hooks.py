"""The listeners every process that changes job states registers with `lifecycle.on_change`: metrics and
webhooks, deletion requests. `install` is called once by the API (`create_app`) and once by each worker process
(`workers.jobs.context.services`); calling it again points the listeners at the newest Redis client and
settings instead of adding a second copy."""

from __future__ import annotations

from app import metrics, webhooks
from app.jobs import lifecycle
from app.records import Records
from app.schemas.jobs import JobRecord, JobState
from app.settings import Settings

_current: dict[str, tuple[Records, Settings]] = {}


def _count(record: JobRecord, previous: JobState | None) -> None:
    if "now" in _current:
        metrics.record_transition(_current["now"][0].index, record, previous)


def _notify(record: JobRecord, previous: JobState | None) -> None:
    if "now" in _current:
        records, settings = _current["now"]
        webhooks.enqueue(records.index, settings, record, previous)


def _requests(record: JobRecord, previous: JobState | None) -> None:
    if "now" in _current:
        from app.deletion import outcomes  # deletion requests move on with their unlearning job

        outcomes.on_job_change(_current["now"][0], record, previous, _current["now"][1])


def install(records: Records, settings: Settings) -> None:
    if not _current:
        lifecycle.on_change(_count)
        lifecycle.on_change(_notify)
        lifecycle.on_change(_requests)
    _current["now"] = (records, settings)
