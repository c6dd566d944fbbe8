"""The reaper: re-enqueue jobs whose worker died, long before the broker's visibility timeout would.

Two ways a dead worker strands a job:
- the job is `running` and its lease (workers/lease.py) expired: the worker died mid-job;
- the job is still `queued` but its message was delivered to a worker that died before starting it: the
  message sits in the broker's unacked set until the visibility timeout. Every worker marks the jobs it
  receives (`delivered:{job}` = its name) and keeps a liveness key (`worker:{name}`) fresh; a queued job
  delivered to a worker whose liveness key expired is re-enqueued.

Every worker's main process runs the reaper on a timer. Re-enqueueing is safe to race: a `reaped` marker
lets one reaper act per attempt, and a duplicate copy of a job is a no-op anyway (the lease and the final
state stop it). A job re-enqueued after its last allowed attempt fails with `worker_crashed`.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from app.errors import NotFound, ServiceUnavailable
from app.queue import enqueue
from app.records import PREFIX, Records, as_text
from workers.lease import lease_key


def delivered_key(job_id: str) -> str:
    return f"{PREFIX}delivered:{job_id}"


def worker_key(worker: str) -> str:
    return f"{PREFIX}worker:{worker}"


log = logging.getLogger(__name__)


def _stranded(records: Records, job_id: str, state: str, attempts: int) -> str | None:
    """Why this job is stranded (a marker naming the case), or None while its worker lives."""
    if state == "running":
        return None if records.index.exists(lease_key(job_id)) else f"running:{attempts}"
    if state == "queued":
        worker = records.index.get(delivered_key(job_id))
        if worker is not None and not records.index.exists(worker_key(as_text(worker))):
            return f"delivered:{as_text(worker)}"
    return None


def reap_once(records: Records, celery: Celery) -> list[str]:
    """One sweep; returns the ids of the jobs it re-enqueued."""
    requeued: list[str] = []
    for active_set in records.index.scan_iter(match=f"{PREFIX}active:*", count=200):
        for raw_id in records.index.smembers(active_set):
            job_id = as_text(raw_id)
            try:
                job = records.get_job(job_id)
            except NotFound:
                continue
            reason = _stranded(records, job_id, job.state, job.attempts)
            if reason is None or not records.index.set(f"{PREFIX}reaped:{job_id}:{reason}", "1", nx=True, ex=86400):
                continue
            log.warning("job lost its worker; re-enqueueing", extra={"job_id": job_id, "reason": reason})
            records.index.delete(delivered_key(job_id))
            enqueue(celery, job_id, job.type)
            requeued.append(job_id)
    return requeued


class ReaperThread(threading.Thread):
    """Keeps this worker's liveness key fresh and sweeps for stranded jobs."""

    def __init__(self, records: Records, celery: Celery, worker: str, lease_seconds: int) -> None:
        super().__init__(name="amend-reaper", daemon=True)
        self.records, self.celery, self.worker = records, celery, worker
        self.lease_seconds = lease_seconds
        self.stopped = threading.Event()

    def beat(self) -> None:
        self.records.index.set(worker_key(self.worker), "1", ex=self.lease_seconds)

    def run(self) -> None:
        while not self.stopped.wait(max(self.lease_seconds / 3, 0.5)):
            try:
                self.beat()
                reap_once(self.records, self.celery)
            except (ServiceUnavailable, OSError) as error:
                log.warning("reaper sweep failed", extra={"error": str(error)})
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad sweep
                log.exception("reaper sweep failed")
