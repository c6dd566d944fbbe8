"""Thin tasks: take an id, re-read state, run the pipeline. Names are explicit and stable."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from celery.signals import task_postrun, task_prerun

from app import logs
from app.deletion.schedules import FIRE_TASK
from app.queue import RUN_JOB
from workers.celery_app import celery_app
from workers.jobs.run import run_job as run_pipeline


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    # every line this job logs carries its id, and once the record is read its tenant and the id of the request
    # that submitted it (the record keeps it); until then, or for a job no request made, the message's id.
    # Under a worker the context is opened by `_open_job_logs`, so Celery's own lines for the task have it too.
    if logs.current("job_id") == job_id:
        run_pipeline(job_id)
        return
    with logs.context(job_id=job_id, request_id=getattr(run_job.request, "id", None)):
        run_pipeline(job_id)


_job_logs: dict[str, AbstractContextManager[dict[str, str]]] = {}


@task_prerun.connect
def _open_job_logs(task_id: str = "", task: Any = None, args: Any = None, **_: Any) -> None:
    """A job's log context from before its task runs until after Celery's trace logs how it ended (the trace's
    'succeeded' / 'raised' line comes before `task_postrun`), so that line carries job_id, tenant and
    request_id as well. One task at a time per process (prefetch 1), on the thread that runs it."""
    if getattr(task, "name", None) == RUN_JOB and args:
        manager = logs.context(job_id=str(args[0]), request_id=task_id)
        manager.__enter__()
        _job_logs[task_id] = manager


@task_postrun.connect
def _close_job_logs(task_id: str = "", **_: Any) -> None:
    manager = _job_logs.pop(task_id, None)
    if manager is not None:
        manager.__exit__(None, None, None)


@celery_app.task(name=FIRE_TASK, acks_late=True)
def fire_schedule(tenant: str, schedule_id: str, slot: str) -> None:
    """Sent by beat (celery-redbeat) at a schedule's slot: submit its job through the API's admission."""
    from datetime import datetime

    from app.deletion.schedules import fire
    from workers.jobs.context import services

    settings, records = services()
    with logs.context(request_id=getattr(fire_schedule.request, "id", None)):  # the job it submits keeps this id
        fire(records, settings, celery_app, tenant, schedule_id, datetime.fromisoformat(slot))
