"""The only place a job's state changes: queued → running → succeeded | failed | cancelled.

Every change goes through `Records.mutate_job` (atomic, durable copy first) and then calls the listeners
registered with `on_change(listener)` once per transition, with the record as stored and the state it left
(`None` for a new job). Events, metrics and webhooks hook in here and nowhere else. A listener that raises is
logged and does not undo or block the transition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from app.errors import Conflict
from app.records import MAX_EVENTS, Records, add_event, now
from app.schemas.jobs import FINAL_STATES, JobError, JobEvent, JobRecord, JobResult, JobState

log = logging.getLogger(__name__)

Listener = Callable[[JobRecord, "JobState | None"], None]
_listeners: list[Listener] = []

CANCEL_FLAG_SECONDS = 7 * 24 * 3600


def on_change(listener: Listener) -> Callable[[], None]:
    """Call `listener(record, previous_state)` after every state change; returns a function that removes it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def _notify(record: JobRecord, previous: JobState | None) -> None:
    for listener in list(_listeners):
        try:
            listener(record, previous)
        except Exception:  # noqa: BLE001 - a listener never breaks a transition
            log.exception("job state listener failed", extra={"job_id": record.id})


def _transition(records: Records, job_id: str, change: Callable[[JobRecord], bool]) -> JobRecord:
    before: list[JobState] = []

    def guarded(record: JobRecord) -> bool:
        before[:] = [record.state]
        return change(record)

    record = records.mutate_job(job_id, guarded)
    if before and before[0] != record.state:
        _notify(record, before[0])
    return record


def create(records: Records, record: JobRecord) -> JobRecord:
    """Store a new job in `queued`."""
    record.state, record.progress, record.stage = "queued", 0.0, "queued"
    add_event(record, "queued")
    records.create_job(record)
    _notify(record, None)
    return record


def start(records: Records, job_id: str, max_attempts: int) -> JobRecord:
    """A worker takes the job: `running` with one more attempt; or `cancelled` when cancel was asked, or
    `failed` (`worker_crashed`) when the job already stopped its worker `max_attempts` times. A job in a final
    state is returned as it is."""

    def change(record: JobRecord) -> bool:
        if record.state in FINAL_STATES:
            return False
        if record.cancel_requested:
            record.state, record.finished_at = "cancelled", now()
            add_event(record, "cancelled")
            return True
        if record.attempts >= max_attempts:
            record.state, record.finished_at = "failed", now()
            record.error = JobError(
                code="worker_crashed",
                message=f"the job stopped its worker {record.attempts} times; giving up after {max_attempts} attempts",
            )
            add_event(record, "failed: worker crashed repeatedly")
            return True
        record.state = "running"
        record.attempts += 1
        record.started_at = record.started_at or now()
        add_event(record, f"running (attempt {record.attempts})")
        return True

    return _transition(records, job_id, change)


def finish(
    records: Records,
    job_id: str,
    state: JobState,
    result: JobResult | None = None,
    error: JobError | None = None,
) -> JobRecord:
    """End a job in `succeeded`, `failed` or `cancelled` (a job already in a final state stays as it is). A
    succeeded job's `result.warnings` (e.g. an unlearning job that did not meet its goal) become events
    `warning: …` just before its final event."""
    if state not in FINAL_STATES:
        raise ValueError(f"{state} is not a final state")

    def change(record: JobRecord) -> bool:
        if record.state in FINAL_STATES:
            return False
        record.state = state
        record.finished_at = now()
        if state == "succeeded":
            record.progress = 1.0
        record.result, record.error = result, error
        for warning in result.warnings if result is not None and state == "succeeded" else []:
            add_event(record, f"warning: {warning}")
        add_event(record, state if error is None else f"{state}: {error.code}")
        return True

    return _transition(records, job_id, change)


def note(records: Records, job_id: str, text: str, progress: float | None = None) -> JobRecord:
    """Add an entry to a job's event log without changing its state, progress or stage (a progress tick with
    its fraction, a webhook attempt after the job ended). Listeners are not called: nothing changed state."""

    def change(record: JobRecord) -> bool:
        shown = record.progress if progress is None else progress
        record.events.append(JobEvent(time=now(), state=record.state, progress=shown, stage=text))
        del record.events[:-MAX_EVENTS]
        return True

    return records.mutate_job(job_id, change)


def cancel(records: Records, job_id: str) -> JobRecord:
    """Ask a job to stop: a queued job is `cancelled` at once; a running one stops at its next progress report
    (the flag is also kept in Redis, where the worker looks). Raises `Conflict` for a finished job."""

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

    records.index.set(records.cancel_key(job_id), "1", ex=CANCEL_FLAG_SECONDS)
    return _transition(records, job_id, change)
