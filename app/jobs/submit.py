"""Job admission, the one way a job comes into being (the API route, and anything that submits on a schedule):
the type's input checks, idempotency, the tenant's quota slot, the record (through `lifecycle`), the enqueue.

Nothing is left behind when admission fails: the quota slot and the idempotency key are released.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from app import logs, webhooks
from app.errors import Conflict, NotFound
from app.jobs import compress as compress_admission
from app.jobs import lifecycle
from app.jobs import merge as merge_admission
from app.jobs import unlearn as unlearn_admission
from app.queue import enqueue
from app.records import Records, new_id, now
from app.schemas.jobs import JobCreate, JobRecord
from app.settings import Settings

# each job type's admission checks: (records, settings, tenant, spec) -> None, raising a typed refusal
ADMISSION_CHECKS: dict[str, Callable[[Records, Settings, str, Any], None]] = {
    "merge": merge_admission.check,
    "unlearn": unlearn_admission.check,
    "compress": compress_admission.check,
}
IDEMPOTENT_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool  # False: the job already made for this Idempotency-Key


ORDERED_KEYS = frozenset({"rank_pattern", "alpha_pattern"})  # PEFT: the first matching key wins


def _pattern_orders(value: Any) -> list[Any]:
    """The key order of every PEFT pattern in the spec (sorting keys must not make two specs equal)."""
    if isinstance(value, dict):
        found = [[name, list(inner)] for name, inner in value.items()
                 if name in ORDERED_KEYS and isinstance(inner, dict)]
        return found + [order for inner in value.values() for order in _pattern_orders(inner)]
    if isinstance(value, list):
        return [order for inner in value for order in _pattern_orders(inner)]
    return []


def request_hash(spec: dict[str, Any]) -> str:
    """Equal for the same request whatever the order of its keys — except the pattern keys, whose order counts."""
    canonical = json.dumps([spec, _pattern_orders(spec)], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _wait_for_job(records: Records, job_id: str, tenant: str) -> JobRecord:
    """The job holding an idempotency key may be a moment from being written by a concurrent request."""
    deadline = time.monotonic() + IDEMPOTENT_WAIT_SECONDS
    while True:
        try:
            return records.get_job(job_id, tenant)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def submit(
    records: Records,
    settings: Settings,
    celery: Celery,
    tenant: str,
    spec: JobCreate,
    idempotency_key: str | None = None,
) -> Submitted:
    from app.deletion.versions import resolve_inputs  # a target's id means its current version

    spec = resolve_inputs(records, tenant, spec)
    spec_dict = spec.model_dump(mode="json", by_alias=True)
    spec_hash = request_hash(spec_dict)
    job_id = new_id("jb")
    if idempotency_key:
        holder = records.claim_idempotency_key(tenant, idempotency_key, job_id)
        if holder is not None:
            existing = _wait_for_job(records, holder, tenant)
            if existing.request_hash != spec_hash:
                raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_conflict")
            return Submitted(existing, created=False)
    try:
        webhooks.check_url(spec.webhook_url, settings)
        ADMISSION_CHECKS[spec.type](records, settings, tenant, spec)
        records.reserve_job_slot(tenant, job_id, settings.max_jobs_per_tenant)
        record = JobRecord(
            id=job_id,
            tenant=tenant,
            type=spec.type,
            method=spec.method,
            state="queued",
            progress=0.0,
            stage="queued",
            created_at=now(),
            spec=spec_dict,
            idempotency_key=idempotency_key,
            request_hash=spec_hash,
            request_id=logs.current("request_id"),
        )
        lifecycle.create(records, record)
    except BaseException:
        records.release_job_slot(tenant, job_id)
        if idempotency_key:
            records.release_idempotency_key(tenant, idempotency_key)
        raise
    enqueue(celery, record.id, record.type, record.tenant, record.request_id)
    return Submitted(record, created=True)
