"""`GET /v1/stats`: who is working, on which device, and how long the queues are. Any key may read it."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Reader, RecordsDep
from app.queue import all_queues, live_workers
from app.records import redis_errors
from app.schemas.stats import StatsPublic, WorkerPublic

router = APIRouter(prefix="/v1/stats", tags=["stats"])


@router.get("", response_model=StatsPublic, response_model_by_alias=True, summary="Workers and queue lengths")
def stats(caller: Reader, records: RecordsDep) -> StatsPublic:
    with redis_errors():
        workers = [WorkerPublic.model_validate(worker) for worker in live_workers(records.index)]
        queues = {name: int(records.index.llen(name)) for name in all_queues()}  # type: ignore[arg-type]
    return StatsPublic(workers=workers, queues=queues)
