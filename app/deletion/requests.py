"""Deletion requests: rows to forget from a target, collected until a schedule honours them.

States: `pending → scheduled (job id) → completed (job id, audit record) | failed (error)`; `cancelled` only
from `pending`. The same rows of the same dataset for the same target are one request while it is open or
completed (idempotent by content); an `Idempotency-Key` names one request too. A request moves on with its job
through `app.deletion.outcomes.on_job_change`, a `lifecycle.on_change` listener (installed by `app.jobs.hooks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from typing import Any

from app import documents
from app.errors import Conflict, NotFound, Unprocessable
from app.records import PREFIX, Records, as_text, new_id, now, redis_errors
from app.schemas.deletion import (
    UnlearningRequestCreate,
    UnlearningRequestPublic,
    UnlearningRequestRecord,
)
from app.schemas.jobs import JobError, JobRecord

log = logging.getLogger(__name__)
KIND = "requests"
KEY_SECONDS = 400 * 24 * 3600


def content_hash(spec: UnlearningRequestCreate) -> str:
    body = {"target": spec.target.model_dump(mode="json"), "dataset": spec.dataset, "rows": spec.rows}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _content_key(tenant: str, digest: str) -> str:
    return f"{PREFIX}request-content:{tenant}:{digest}"


def _idempotency_key(tenant: str, key: str) -> str:
    return f"{PREFIX}request-idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def get(records: Records, tenant: str, request_id: str) -> UnlearningRequestRecord:
    return documents.get(records, KIND, UnlearningRequestRecord, tenant, request_id)


def check_rows(records: Records, tenant: str, spec: UnlearningRequestCreate) -> None:
    """The target and dataset exist for this tenant and every row is one of the dataset's (422 naming the first
    that is not)."""
    records.get_resource("models", tenant, spec.target.model)
    if spec.target.adapter:
        records.get_adapter(tenant, spec.target.adapter)
    dataset = records.get_resource("datasets", tenant, spec.dataset)
    bad = next((row for row in spec.rows if row >= dataset.rows), None)
    if bad is not None:
        raise Unprocessable(
            f"row {bad} does not exist: dataset {dataset.id} has rows 0..{dataset.rows - 1}", code="invalid_rows"
        )


def create(
    records: Records, tenant: str, spec: UnlearningRequestCreate, idempotency_key: str | None = None
) -> tuple[UnlearningRequestRecord, bool]:
    """The new request (True), or the one these rows or this key already made (False)."""
    check_rows(records, tenant, spec)
    digest = content_hash(spec)
    request_id = new_id("rq")
    claimed: list[str] = []
    with redis_errors():
        for slot in ([_idempotency_key(tenant, idempotency_key)] if idempotency_key else []) + [
            _content_key(tenant, digest)
        ]:
            if records.index.set(slot, request_id, nx=True, ex=KEY_SECONDS):
                claimed.append(slot)
                continue
            holder = as_text(records.index.get(slot) or b"")
            try:
                existing = get(records, tenant, holder)
            except NotFound:  # a key left by a request being written, or lost: take it over
                records.index.set(slot, request_id, ex=KEY_SECONDS)
                claimed.append(slot)
                continue
            for mine in claimed:
                records.index.delete(mine)
            if existing.content_hash != digest:
                raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_conflict")
            return existing, False
    stamp = now()
    record = UnlearningRequestRecord(
        id=request_id, tenant=tenant, state="pending", target=spec.target, dataset=spec.dataset, rows=spec.rows,
        reason=spec.reason, requested_by=spec.requested_by, deadline=spec.deadline, created_at=stamp,
        updated_at=stamp, content_hash=digest, idempotency_key=idempotency_key,
    )
    try:
        documents.put(records, KIND, record)
    except BaseException:
        with redis_errors():
            for slot in claimed:
                records.index.delete(slot)
        raise
    return record, True


def _release_content(records: Records, record: UnlearningRequestRecord) -> None:
    """A cancelled or failed request no longer stands for its rows: the same rows may be requested anew."""
    with redis_errors():
        slot = _content_key(record.tenant, record.content_hash)
        if as_text(records.index.get(slot) or b"") == record.id:
            records.index.delete(slot)


def cancel(records: Records, tenant: str, request_id: str) -> UnlearningRequestRecord:
    def change(record: UnlearningRequestRecord) -> bool:
        if record.state != "pending":
            raise Conflict(f"request {record.id} is {record.state}; only a pending request can be cancelled",
                           code="request_not_pending")
        record.state, record.updated_at = "cancelled", now()
        return True

    record = documents.mutate(records, KIND, UnlearningRequestRecord, tenant, request_id, change)
    _release_content(records, record)
    return record


def pending_for(records: Records, tenant: str, target_key: str) -> list[UnlearningRequestRecord]:
    """Every pending request for the target, oldest first."""
    found = documents.all_of(records, KIND, UnlearningRequestRecord, tenant)
    return [r for r in reversed(found) if r.state == "pending" and r.target.key() == target_key]


def claim(records: Records, tenant: str, target_key: str, schedule_id: str, key: str) -> list[UnlearningRequestRecord]:
    """Take the target's pending requests for one run (`scheduled`, no job yet), so none can be cancelled while
    its job is submitted. One job forgets rows of one dataset: the requests on the dataset of the oldest pending
    request go in this run; requests on other datasets stay pending for the following runs. Requests this run's
    key already took (a firing that stopped before submitting) are taken again."""
    candidates = [
        r for r in reversed(documents.all_of(records, KIND, UnlearningRequestRecord, tenant))
        if r.target.key() == target_key and (r.state == "pending" or (r.state == "scheduled" and r.claim == key))
    ]
    if not candidates:
        return []
    dataset = candidates[0].dataset
    taken = []
    for candidate in candidates:
        if candidate.dataset != dataset:
            continue

        def change(record: UnlearningRequestRecord) -> bool:
            if record.state == "scheduled" and record.claim == key:
                return False
            if record.state != "pending":
                raise _Gone
            record.state, record.schedule_id, record.claim, record.updated_at = "scheduled", schedule_id, key, now()
            return True

        try:
            taken.append(documents.mutate(records, KIND, UnlearningRequestRecord, tenant, candidate.id, change))
        except _Gone:
            continue
    return taken


class _Gone(Exception):
    """The request left `pending` (cancelled) between the listing and the claim."""


def release(records: Records, tenant: str, request_ids: list[str], key: str) -> None:
    """Give claimed requests back (their job could not be submitted): `pending` again."""
    for request_id in request_ids:
        def change(record: UnlearningRequestRecord) -> bool:
            if record.state != "scheduled" or record.claim != key or record.job_id is not None:
                return False
            record.state, record.schedule_id, record.claim, record.updated_at = "pending", None, None, now()
            return True

        documents.mutate(records, KIND, UnlearningRequestRecord, tenant, request_id, change)


def attach_job(records: Records, tenant: str, request_ids: list[str], job_id: str, key: str) -> None:
    """Name the job on the claimed requests (a job that already ended has completed them: left as they are)."""
    for request_id in request_ids:
        def change(record: UnlearningRequestRecord) -> bool:
            if record.claim != key or record.job_id is not None:
                return False
            record.job_id, record.updated_at = job_id, now()
            return True

        documents.mutate(records, KIND, UnlearningRequestRecord, tenant, request_id, change)


def job_ended(records: Records, job: JobRecord) -> list[UnlearningRequestRecord]:
    """Complete (or fail) the requests a finished unlearning job honoured."""
    done = []
    for request_id in job.spec.get("requests") or []:
        def change(record: UnlearningRequestRecord) -> bool:
            if record.state != "scheduled" or record.job_id not in (None, job.id):
                return False
            record.job_id, record.updated_at = job.id, now()
            if job.state == "succeeded":
                record.state = "completed"
                record.audit_record = job.result.audit_key if job.result else None
            else:
                record.state = "failed"
                record.error = job.error or JobError(code=f"job_{job.state}", message=f"job {job.id} was {job.state}")
            return True

        try:
            record = documents.mutate(records, KIND, UnlearningRequestRecord, job.tenant, request_id, change)
        except NotFound:
            continue
        if record.state == "failed":
            _release_content(records, record)
        done.append(record)
    return done


def honoured(records: Records, tenant: str, request_ids: list[str], row_sha256: list[str]) -> list[dict[str, Any]]:
    """The audit record's `requests`: each request an unlearning job honours, with its rows and their hashes."""
    entries = []
    for request_id in request_ids:
        record = get(records, tenant, request_id)
        entries.append({
            "id": record.id, "dataset_id": record.dataset, "rows": record.rows,
            "row_sha256": [row_sha256[i] for i in record.rows], "requested_by": record.requested_by,
            "created_at": record.created_at.isoformat(),
        })
    return entries


def public(record: UnlearningRequestRecord, next_runs: dict[str, datetime]) -> UnlearningRequestPublic:
    """The request as clients see it: `at_risk` when pending and its deadline falls before its target's next
    scheduled run (or no schedule serves its target)."""
    at_risk = False
    if record.state == "pending" and record.deadline is not None:
        next_run = next_runs.get(record.target.key())
        at_risk = next_run is None or record.deadline < next_run
    return record.public(at_risk=at_risk)


def reindex(records: Records, found: list[tuple[str, dict[str, object]]]) -> int:
    """Rebuild the content and Idempotency-Key slots of requests that still stand for their rows."""
    with redis_errors():
        for _tenant, data in found:
            record = UnlearningRequestRecord.model_validate(data)
            if record.state in ("pending", "scheduled", "completed"):
                records.index.set(_content_key(record.tenant, record.content_hash), record.id, ex=KEY_SECONDS)
            if record.idempotency_key:
                records.index.set(_idempotency_key(record.tenant, record.idempotency_key), record.id,
                                  ex=KEY_SECONDS)
    return len(found)
