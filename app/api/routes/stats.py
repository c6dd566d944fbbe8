"""`GET /v1/stats`: the caller's tenant's jobs by state and type, who is working, on which device, and how long
the queues are. Any key may read it; the job counts are only ever the caller's own."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Reader, RecordsDep
from app.metrics import tenant_job_counts
from app.queue import all_queues, live_workers
from app.records import redis_errors
from app.schemas.stats import StatsPublic, WorkerPublic

router = APIRouter(prefix="/v1/stats", tags=["stats"])


@router.get("", response_model=StatsPublic, response_model_by_alias=True, summary="Workers and queue lengths")
def stats(caller: Reader, records: RecordsDep) -> StatsPublic:
    with redis_errors():
        workers = [WorkerPublic.model_validate(worker) for worker in live_workers(records.index)]
        queues = {name: int(records.index.llen(name)) for name in all_queues()}  # type: ignore[arg-type]
        jobs = tenant_job_counts(records.index, caller.tenant)
    return StatsPublic(jobs=jobs, workers=workers, queues=queues)
