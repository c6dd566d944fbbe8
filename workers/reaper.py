"""The reaper: re-enqueue `running` jobs whose lease expired, because the worker running them died.

Every worker process runs it on a timer (see `celery_app`), well inside the broker's visibility timeout.
Re-enqueueing is safe to race: the `reaped` marker lets one reaper act per attempt, and a duplicate copy of
a job is a no-op anyway (the lease, and the final state, stop it). A job re-enqueued after its last allowed
attempt fails with `worker_crashed` when it is picked up.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from app.errors import NotFound, ServiceUnavailable
from app.queue import enqueue
from app.records import PREFIX, Records
from workers.lease import lease_key

log = logging.getLogger(__name__)


def reap_once(records: Records, celery: Celery) -> list[str]:
    """One sweep; returns the ids of the jobs it re-enqueued."""
    requeued: list[str] = []
    for active_set in records.index.scan_iter(match=f"{PREFIX}active:*", count=200):
        for raw_id in records.index.smembers(active_set):
            job_id = raw_id.decode()
            try:
                job = records.get_job(job_id)
            except NotFound:
                continue
            if job.state != "running" or records.index.exists(lease_key(job_id)):
                continue
            marker = f"{PREFIX}reaped:{job_id}:{job.attempts}"
            if not records.index.set(marker, "1", nx=True, ex=24 * 3600):
                continue
            log.warning("job lost its worker; re-enqueueing", extra={"job_id": job_id, "attempts": job.attempts})
            enqueue(celery, job_id, job.type)
            requeued.append(job_id)
    return requeued


class ReaperThread(threading.Thread):
    def __init__(self, records: Records, celery: Celery, interval: float) -> None:
        super().__init__(name="amend-reaper", daemon=True)
        self.records, self.celery, self.interval = records, celery, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                reap_once(self.records, self.celery)
            except (ServiceUnavailable, OSError) as error:
                log.warning("reaper sweep failed", extra={"error": str(error)})
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad sweep
                log.exception("reaper sweep failed")
