"""What happens when an unlearning job that honoured deletion requests ends: the requests complete (or fail),
a scheduled run's output becomes the target's next version (promoted as its schedule says), each request names
the stale descendants of the version it was unlearned from, and those are rebuilt when the schedule asks.

A `lifecycle.on_change` listener, installed by `app.jobs.hooks`. It sits apart from `requests` because it
reaches schedules, versions and lineage, which themselves use requests.
"""

from __future__ import annotations

from typing import Any

from app import documents
from app.deletion import lineage, requests, schedules, versions
from app.errors import NotFound
from app.records import Records
from app.schemas.deletion import Promote, UnlearningRequestRecord, UnlearnPendingJob
from app.schemas.jobs import JobRecord, JobState


def on_job_change(records: Records, job: JobRecord, previous: JobState | None, settings: Any = None) -> None:
    if job.type == "unlearn" and job.state in ("succeeded", "failed", "cancelled"):
        done = requests.job_ended(records, job)
        if job.state == "succeeded" and done and done[0].schedule_id:
            _new_version(records, job, done, settings)
    elif (job.state == "succeeded" and settings is not None
          and (job.idempotency_key or "").startswith(lineage.REBUILD_PREFIX)):
        lineage.rebuilt(records, settings, job)  # a stale descendant rebuilt from an unlearned version


def _new_version(records: Records, job: JobRecord, done: list[UnlearningRequestRecord], settings: Any) -> None:
    """A scheduled run's output becomes the target's next version (promoted as its schedule says); each
    request names it and the stale descendants of the version it was unlearned from - rebuilt from the new
    version when the schedule says `rebuild_descendants` and the new version became current."""
    promote, rebuild = Promote(mode="never"), False
    try:
        schedule = schedules.get(records, job.tenant, done[0].schedule_id or "")
        pending = UnlearnPendingJob.model_validate(schedule.job)
        promote, rebuild = pending.promote, pending.rebuild_descendants
    except (NotFound, ValueError):
        pass  # the schedule is gone: the version is kept for review
    number = versions.add_from_job(records, job, done[0].target, promote, [r.id for r in done])
    source = job.spec.get("adapter") or job.spec.get("model") or ""
    stale = [node.id for node in lineage.stale_descendants(records, job.tenant, source)]
    new = (job.result.adapter_id or job.result.model_id) if job.result else None
    jobs: dict[str, str] = {}
    current = versions.get(records, job.tenant, done[0].target).current == number
    if rebuild and stale and new and current and settings is not None:
        jobs = lineage.rebuild_children(records, settings, job.tenant, source, new, job.id)
    for record in done:
        def change(request: UnlearningRequestRecord) -> bool:
            request.version, request.stale_descendants, request.rebuild_jobs = number, stale, jobs
            return True

        documents.mutate(records, requests.KIND, UnlearningRequestRecord, job.tenant, record.id, change)
