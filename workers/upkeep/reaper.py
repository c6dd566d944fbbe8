"""The reaper: re-enqueue jobs whose worker died, long before the broker's visibility timeout would.

Two ways a dead worker strands a job:
- the job is `running` and its lease (workers/lease.py) expired: the worker died mid-job;
- the job is still `queued` but its message was delivered to a worker that died before starting it: the
  message sits in the Redis transport's unacked set (kombu's `unacked` / `unacked_index`) until the
  visibility timeout. With late acks and prefetch 1 a live worker starts a delivered job at once, so a
  queued job whose message has been unacknowledged for two lease periods was stranded.

Every worker's main process runs the reaper on a timer. Re-enqueueing is safe to race: a `reaped` marker
lets one reaper act per attempt (or per delivery), and a duplicate copy of a job is a no-op anyway (the
lease and the final state stop it; so is the stale message the broker restores later). A job re-enqueued
after its last allowed attempt fails with `worker_crashed`.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery

from app import metrics
from app.errors import NotFound, ServiceUnavailable
from app.queue import JOB_TYPES, enqueue, queue_for
from app.records import PREFIX, Records, as_text
from app.schemas.jobs import JobRecord
from workers.upkeep import scratch
from workers.upkeep.lease import lease_key

log = logging.getLogger(__name__)
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's Redis transport defaults
ORPHAN_AGE = 60.0  # seconds a queued job may be without any message before it is re-enqueued


def _job_id(message: dict[str, Any]) -> str | None:
    """The job id a `workers.run_job` message carries (its first argument), or None if it is not one."""
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return str(json.loads(body)[0][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def stale_deliveries(records: Records, older_than: float) -> Iterator[tuple[str, str]]:
    """(delivery tag, job id) of messages delivered more than `older_than` seconds ago and not yet acked."""
    cutoff = time.time() - older_than
    for member in records.index.zrangebyscore(UNACKED_INDEX, "-inf", cutoff):
        tag = as_text(member)  # type: ignore[arg-type]  # plain members: no scores were asked for
        raw = records.index.hget(UNACKED, tag)
        if raw is None:
            continue
        try:
            job_id = _job_id(json.loads(raw)[0])
        except (ValueError, IndexError, TypeError):
            continue
        if job_id is not None:
            yield tag, job_id


def _queued_message_job_ids(records: Records) -> set[str]:
    """Job ids of every message waiting in a job queue or delivered and not yet acked."""
    messages: list[Any] = []
    for job_type in JOB_TYPES:
        for key in records.index.scan_iter(match=f"{queue_for(job_type)}*", count=100):
            if as_text(records.index.type(key)) == "list":  # type: ignore[arg-type]
                messages += records.index.lrange(key, 0, -1)  # type: ignore[operator]
    # an unacked entry is [message, exchange, routing key]
    messages += records.index.hvals(UNACKED)  # type: ignore[operator]
    ids: set[str] = set()
    for raw in messages:
        try:
            message = json.loads(raw)
            job_id = _job_id(message[0] if isinstance(message, list) else message)
        except (ValueError, IndexError, TypeError):
            continue
        if job_id is not None:
            ids.add(job_id)
    return ids


def orphaned_jobs(records: Records, queued: list[JobRecord], older_than: float) -> list[JobRecord]:
    """Queued jobs older than `older_than` seconds whose message is nowhere — neither waiting in a queue nor
    delivered-and-unacked. Kombu's Redis transport pops a message and records it as unacked in two steps, so
    a worker killed between them loses the message; the soak test saw 2 of 594 jobs stranded this way."""
    cutoff = time.time() - older_than
    old = [job for job in queued if job.created_at.timestamp() < cutoff]
    if not old:
        return []
    present = _queued_message_job_ids(records)
    return [job for job in old if job.id not in present]


def _requeue(records: Records, celery: Celery, job_id: str, job_type: str, reason: str, ttl: float = 86400) -> bool:
    if not records.index.set(f"{PREFIX}reaped:{job_id}:{reason}", "1", nx=True, ex=max(1, int(ttl))):
        return False
    log.warning("job lost its worker; re-enqueueing", extra={"job_id": job_id, "reason": reason})
    enqueue(celery, job_id, job_type)
    return True


def reap_once(records: Records, celery: Celery, lease_seconds: float, orphan_age: float = ORPHAN_AGE) -> list[str]:
    """One sweep; returns the ids of the jobs it re-enqueued."""
    requeued: list[str] = []
    queued: list[JobRecord] = []
    for active_set in records.index.scan_iter(match=f"{PREFIX}active:*", count=200):
        for raw_id in records.index.smembers(active_set):
            job_id = as_text(raw_id)
            try:
                job = records.get_job(job_id)
            except NotFound:
                continue
            if job.state == "queued":
                queued.append(job)
            if job.state == "running" and not records.index.exists(lease_key(job_id)):
                if _requeue(records, celery, job_id, job.type, f"running:{job.attempts}"):
                    requeued.append(job_id)
    for tag, job_id in stale_deliveries(records, older_than=2 * lease_seconds):
        try:
            job = records.get_job(job_id)
        except NotFound:
            continue
        if job.state == "queued" and _requeue(records, celery, job_id, job.type, f"delivery:{tag}"):
            requeued.append(job_id)
    for job in orphaned_jobs(records, queued, older_than=orphan_age):
        # at most one such re-enqueue per job per `orphan_age`, across all reapers
        if job.id not in requeued and _requeue(records, celery, job.id, job.type, "orphan", ttl=orphan_age):
            requeued.append(job.id)
    return requeued


class ReaperThread(threading.Thread):
    """Reaps stranded jobs every half lease; also sweeps scratch directories left by killed workers (at
    start and every `SCRATCH_SWEEP_SECONDS`)."""

    SCRATCH_SWEEP_SECONDS = 300.0

    def __init__(self, records: Records, celery: Celery, lease_seconds: int, scratch_max_age: float) -> None:
        super().__init__(name="amend-reaper", daemon=True)
        self.records, self.celery, self.lease_seconds = records, celery, lease_seconds
        self.scratch_max_age = scratch_max_age
        self.stopped = threading.Event()

    def run(self) -> None:
        swept = 0.0
        while not self.stopped.wait(max(self.lease_seconds / 2, 0.5) if swept else 0.0):
            if time.monotonic() - swept >= self.SCRATCH_SWEEP_SECONDS or not swept:
                scratch.sweep(self.scratch_max_age)
                swept = time.monotonic()
            try:
                reap_once(self.records, self.celery, self.lease_seconds)
                metrics.worker_errors.flush(self.records.index)  # what this process met while Redis was away
            except (ServiceUnavailable, OSError) as error:
                metrics.worker_errors.count(self.records.index, error)
                log.warning("reaper sweep failed", extra={"error": str(error)})
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad sweep
                log.exception("reaper sweep failed")
