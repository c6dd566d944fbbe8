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
from app.schemas.deletion import Promote, TargetVersions, UnlearningRequestRecord, UnlearnPendingJob
from app.schemas.jobs import JobRecord, JobState


def on_job_change(records: Records, job: JobRecord, previous: JobState | None, settings: Any = None) -> None:
    if job.type == "unlearn" and job.state in ("succeeded", "failed", "cancelled"):
        done = requests.job_ended(records, job)
        if job.state == "succeeded" and done and done[0].schedule_id:
            _new_version(records, job, done, settings)
    elif (job.state == "succeeded" and settings is not None
          and (job.idempotency_key or "").startswith(lineage.REBUILD_PREFIX)):
        lineage.rebuilt(records, settings, job)  # a stale descendant rebuilt from an unlearned version


def _schedule_says(records: Records, tenant: str, schedule_id: str | None) -> tuple[Promote, bool]:
    """(promote, rebuild_descendants) of the schedule whose run made a version; a schedule that is gone keeps
    its versions for review and rebuilds nothing."""
    try:
        schedule = schedules.get(records, tenant, schedule_id or "")
        pending = UnlearnPendingJob.model_validate(schedule.job)
    except (NotFound, ValueError):
        return Promote(mode="never"), False
    return pending.promote, pending.rebuild_descendants


def _new_version(records: Records, job: JobRecord, done: list[UnlearningRequestRecord], settings: Any) -> None:
    """A scheduled run's output becomes the target's next version (promoted as its schedule says); each
    request names it and the stale descendants of the version it was unlearned from - rebuilt from the new
    version when the schedule says `rebuild_descendants` and the new version became current."""
    promote, rebuild = _schedule_says(records, job.tenant, done[0].schedule_id)
    number = versions.add_from_job(records, job, done[0].target, promote, [r.id for r in done])
    current = versions.get(records, job.tenant, done[0].target).current == number
    _stale(records, settings, job, [r.id for r in done], number, rebuild and current)


def promoted(records: Records, settings: Any, tenant: str, record_id: str, number: int) -> None:
    """A version was promoted by `POST …/versions/{v}/promote`: when a scheduled run made it and its schedule
    says `rebuild_descendants`, the stale descendants of the version it was unlearned from are rebuilt from it,
    as an automatic promotion does (once per run: the rebuilds' idempotency keys name the run's job)."""
    try:
        version = documents.get(records, versions.KIND, TargetVersions, tenant, record_id).versions[number - 1]
        first = requests.get(records, tenant, version.requests[0]) if version.job_id and version.requests else None
    except NotFound:
        return  # only version 1 exists
    if first is None:
        return  # version 1, or a rebuilt descendant's version
    _, rebuild = _schedule_says(records, tenant, first.schedule_id)
    if rebuild:
        _stale(records, settings, records.get_job(version.job_id or "", tenant), version.requests, number, True)


def _stale(records: Records, settings: Any, job: JobRecord, request_ids: list[str], number: int,
           rebuild: bool) -> None:
    """Name the new version and the stale descendants of the version `job` unlearned from on each request; with
    `rebuild`, submit their rebuilds from the new version (or say on the request why one cannot be)."""
    source = job.spec.get("adapter") or job.spec.get("model") or ""
    stale = [node.id for node in lineage.stale_descendants(records, job.tenant, source)]
    new = (job.result.adapter_id or job.result.model_id) if job.result else None
    jobs: dict[str, str] = {}
    refused: dict[str, str] = {}
    if rebuild and stale and new and settings is not None:
        jobs, refused = lineage.rebuild_children(records, settings, job.tenant, source, new, job.id)
    for request_id in request_ids:
        def change(request: UnlearningRequestRecord) -> bool:
            request.version, request.stale_descendants = number, stale
            request.rebuild_jobs = {**request.rebuild_jobs, **jobs}
            request.rebuild_refused = {k: v for k, v in {**request.rebuild_refused, **refused}.items()
                                       if k not in request.rebuild_jobs}
            return True

        documents.mutate(records, requests.KIND, UnlearningRequestRecord, job.tenant, request_id, change)
