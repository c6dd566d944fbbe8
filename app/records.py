"""Adapter and job records: the durable copy in S3, the index in Redis.

S3 is the source of truth: `tenants/{tenant}/adapters/{id}/record.json`, `tenants/{tenant}/jobs/{id}/
record.json`. Redis caches every record for fast listing and polling and holds what only matters while a
job runs (progress, the cancel flag, leases, idempotency keys). `reindex()` rebuilds the Redis index from
S3, so losing Redis loses no data. Every Redis failure surfaces as `IndexUnavailable` (HTTP 503).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import redis

from app.errors import Conflict, IndexUnavailable, NotFound, QuotaExceeded
from app.schemas.adapters import AdapterRecord
from app.schemas.datasets import DatasetRecord
from app.schemas.jobs import ACTIVE_STATES, JobEvent, JobRecord
from app.schemas.models import ModelRecord
from app.settings import Settings
from app.storage import Storage, keys

log = logging.getLogger(__name__)
PREFIX = "amend:"
MAX_EVENTS = 200


def new_id(prefix: str) -> str:
    """Time-ordered ids: 14 hex digits of microseconds, then 10 random hex digits."""
    return f"{prefix}_{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


STALE_RESERVATION_SECONDS = 300


def _id_age_seconds(record_id: str) -> float:
    """Seconds since `new_id` made this id (its first 14 hex digits after the prefix are microseconds)."""
    try:
        made = int(record_id.partition("_")[2][:14], 16) / 1e6
    except ValueError:
        return float("inf")
    return time.time() - made


def now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise IndexUnavailable("the Redis index is unavailable; retry shortly") from error


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def _decode_cursor(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise NotFound("unknown cursor") from None
    if len(value) > 64 or not value.replace("_", "").isalnum():
        raise NotFound("unknown cursor")
    return value


class Records:
    def __init__(self, storage: Storage, index: redis.Redis) -> None:
        self.storage = storage
        self.index = index

    @classmethod
    def connect(cls, settings: Settings, socket_timeout: float = 5.0) -> Records:
        """Records on the configured object storage and Redis index (the one way every process opens them)."""
        index = redis.Redis.from_url(
            settings.redis_url, socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 5.0)
        )
        return cls(Storage(settings), index)

    # -- keys ---------------------------------------------------------------------------------------
    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def active_key(tenant: str) -> str:
        return f"{PREFIX}active:{tenant}"

    @staticmethod
    def cancel_key(job_id: str) -> str:
        return f"{PREFIX}cancel:{job_id}"

    @staticmethod
    def progress_key(job_id: str) -> str:
        return f"{PREFIX}progress:{job_id}"

    @staticmethod
    def jobs_version_key(tenant: str) -> str:
        """A random token replaced, in the same transaction, by every write that can change what the tenant's
        job list shows (a record, a job's live progress): the list's ETag is made from it, so a poll of an
        unchanged list is answered 304 without reading the list. Random, not a counter, so a Redis that was
        lost and rebuilt never hands out a token an old ETag was made from."""
        return f"{PREFIX}jobs-version:{tenant}"

    def jobs_version(self, tenant: str) -> str:
        """The tenant's current job-list version (made now if Redis has none: a new or rebuilt index)."""
        key = self.jobs_version_key(tenant)
        with redis_errors():
            pipe = self.index.pipeline()
            pipe.set(key, secrets.token_hex(8), nx=True)
            pipe.get(key)
            return as_text(pipe.execute()[1])

    # -- adapters, models and datasets: one path (kind is "adapters", "models" or "datasets") ----------
    def put_adapter(self, record: AdapterRecord) -> None:
        self.put_resource("adapters", record)

    def get_adapter(self, tenant: str, adapter_id: str) -> AdapterRecord:
        record: AdapterRecord = self.get_resource("adapters", tenant, adapter_id)
        return record

    def list_adapters(self, tenant: str, limit: int, cursor: str | None) -> tuple[list[AdapterRecord], str | None]:
        return self.list_resources("adapters", tenant, limit, cursor)

    def delete_adapter(self, tenant: str, adapter_id: str) -> None:
        self.delete_resource("adapters", tenant, adapter_id)

    def stored_bytes(self, tenant: str) -> int:
        with redis_errors():
            return int(self.index.get(f"{PREFIX}bytes:{tenant}") or 0)

    def add_stored_bytes(self, tenant: str, size: int) -> None:
        with redis_errors():
            self.index.incrby(f"{PREFIX}bytes:{tenant}", size)

    def reserve_bytes(self, tenant: str, size: int, limit: int, hint: str) -> None:
        """Count `size` bytes against the tenant's storage quota before storing them, atomically, so concurrent
        uploads cannot all pass a check-then-add; QuotaExceeded (and nothing counted) past `limit`. A failed
        upload gives the bytes back with `release_bytes`."""
        with redis_errors():
            total = self.index.incrby(f"{PREFIX}bytes:{tenant}", size)
            if total > limit:
                self.index.decrby(f"{PREFIX}bytes:{tenant}", size)
                raise QuotaExceeded(f"this tenant's storage quota is used up; {hint}")

    def release_bytes(self, tenant: str, size: int) -> None:
        """Best effort: give back a failed upload's reservation (the original error is what callers see)."""
        try:
            self.add_stored_bytes(tenant, -size)
        except IndexUnavailable:
            log.warning("could not release reserved bytes", extra={"tenant": tenant, "bytes": size})

    def put_resource(self, kind: str, record: Resource) -> None:
        """Publish an adapter, model or dataset: its files are already stored; the record is the final PUT."""
        key_of, _ = _RESOURCES[kind]
        self.storage.put_json(key_of(record.tenant, record.id, "record.json"), record.model_dump(mode="json"))
        self._index_resource(kind, record)

    def _index_resource(self, kind: str, record: Resource) -> None:
        with redis_errors():
            pipe = self.index.pipeline()
            pipe.set(f"{PREFIX}{kind}:{record.tenant}:{record.id}", record.model_dump_json())
            pipe.zadd(f"{PREFIX}{kind}-list:{record.tenant}", {record.id: 0})
            pipe.execute()

    def get_resource(self, kind: str, tenant: str, resource_id: str) -> Any:
        key_of, cls = _RESOURCES[kind]
        noun = kind.removesuffix("s")
        with redis_errors():
            raw = self.index.get(f"{PREFIX}{kind}:{tenant}:{resource_id}")
        if raw is None:
            try:
                record = cls.model_validate(self.storage.get_json(key_of(tenant, resource_id, "record.json")))
            except NotFound:
                raise NotFound(f"{noun} {resource_id} not found") from None
            self._index_resource(kind, record)
        else:
            record = cls.model_validate_json(raw)
        if record.deleted or record.tenant != tenant:
            raise NotFound(f"{noun} {resource_id} not found")
        return record

    def list_resources(self, kind: str, tenant: str, limit: int, cursor: str | None) -> tuple[list[Any], str | None]:
        ids, next_cursor = self._page(f"{PREFIX}{kind}-list:{tenant}", limit, cursor, lambda _id: True)
        return [self.get_resource(kind, tenant, i) for i in ids], next_cursor

    def delete_resource(self, kind: str, tenant: str, resource_id: str) -> None:
        key_of, _ = _RESOURCES[kind]
        noun = kind.removesuffix("s")
        record = self.get_resource(kind, tenant, resource_id)
        for job in self.active_jobs(tenant):
            if resource_id in _USED_BY[kind](job):
                raise Conflict(f"{noun} {resource_id} is used by {job.state} job {job.id}", code=f"{noun}_in_use")
        self.storage.delete(key_of(tenant, resource_id, "record.json"))
        with redis_errors():
            pipe = self.index.pipeline()
            pipe.delete(f"{PREFIX}{kind}:{tenant}:{resource_id}")
            pipe.zrem(f"{PREFIX}{kind}-list:{tenant}", resource_id)
            pipe.decrby(f"{PREFIX}bytes:{tenant}", record.size_bytes)
            pipe.execute()
        self.storage.delete_prefix(key_of(tenant, resource_id))

    # -- jobs ---------------------------------------------------------------------------------------
    def create_job(self, record: JobRecord) -> None:
        self.storage.put_json(keys.job(record.tenant, record.id, "record.json"), record.model_dump(mode="json"))
        self._index_job(record)

    def _index_job(self, record: JobRecord) -> None:
        with redis_errors():
            pipe = self.index.pipeline()
            pipe.set(self._job_key(record.id), record.model_dump_json())
            pipe.zadd(f"{PREFIX}jobs:{record.tenant}", {record.id: 0})
            if record.state in ACTIVE_STATES:
                pipe.sadd(self.active_key(record.tenant), record.id)
            else:
                pipe.srem(self.active_key(record.tenant), record.id)
            pipe.set(self.jobs_version_key(record.tenant), secrets.token_hex(8))
            pipe.execute()

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """A job with live progress. With a tenant, another tenant's job is reported as missing."""
        with redis_errors():
            raw, progress = self.index.mget(self._job_key(job_id), self.progress_key(job_id))
        if raw is None:
            if tenant is None:
                raise NotFound(f"job {job_id} not found")
            try:
                record = JobRecord.model_validate(self.storage.get_json(keys.job(tenant, job_id, "record.json")))
            except NotFound:
                raise NotFound(f"job {job_id} not found") from None
            self._index_job(record)
        else:
            record = JobRecord.model_validate_json(raw)
        return self.job_from_index(job_id, record, progress, tenant)

    def job_keys(self, job_id: str) -> tuple[str, str]:
        """The two index keys `get_job` reads with one MGET: the record and its live progress."""
        return self._job_key(job_id), self.progress_key(job_id)

    @staticmethod
    def job_from_index(
        job_id: str, record: JobRecord, progress: bytes | str | None, tenant: str | None
    ) -> JobRecord:
        """The record as a reader sees it: another tenant's is missing; a running job shows its live progress."""
        if tenant is not None and record.tenant != tenant:
            raise NotFound(f"job {job_id} not found")
        if progress is not None and record.state == "running":
            value, _, stage = as_text(progress).partition("|")
            record.progress, record.stage = max(record.progress, float(value)), stage
        return record

    def mutate_job(self, job_id: str, change: Callable[[JobRecord], bool]) -> JobRecord:
        """Apply `change` to the current record atomically (optimistic, WATCH on the index key).

        The durable copy is written to S3 before the index commits, so the two never disagree on a state
        the index has already moved past; a lost race retries and rewrites both — or, when the retry finds
        nothing left to change (the winner finished the job), puts the winner's record back in S3 over the copy
        the lost attempt wrote. `change` returns False to leave the record as it is.
        """
        key = self._job_key(job_id)
        lost_write = False  # a durable copy this call wrote, then lost the race for: it must not stay in S3
        with redis_errors():
            for _ in range(50):
                with self.index.pipeline() as pipe:
                    try:
                        pipe.watch(key)
                        raw = pipe.get(key)
                        if raw is None:
                            pipe.reset()
                            raise NotFound(f"job {job_id} not found")
                        record = JobRecord.model_validate_json(raw)
                        if not change(record):
                            if lost_write:  # put the winner's record back over the copy this call wrote
                                winner = JobRecord.model_validate_json(raw)
                                self.storage.put_json(keys.job(winner.tenant, winner.id, "record.json"),
                                                      winner.model_dump(mode="json"))
                                pipe.multi()
                                pipe.execute()  # WatchError if a newer write came meanwhile: go round again
                            return record
                        lost_write = True
                        self.storage.put_json(
                            keys.job(record.tenant, record.id, "record.json"), record.model_dump(mode="json")
                        )
                        pipe.multi()
                        pipe.set(key, record.model_dump_json())
                        if record.state in ACTIVE_STATES:
                            pipe.sadd(self.active_key(record.tenant), record.id)
                        else:
                            pipe.srem(self.active_key(record.tenant), record.id)
                            pipe.delete(self.progress_key(record.id))
                        pipe.set(self.jobs_version_key(record.tenant), secrets.token_hex(8))
                        pipe.execute()
                        return record
                    except redis.WatchError:
                        continue
        raise Conflict(f"job {job_id} is being updated concurrently")

    def set_progress(self, job_id: str, progress: float, stage: str, tenant: str | None = None) -> None:
        """A running job's live progress (and a new version of its tenant's job list, which shows it). Pass
        the job's tenant when it is known; without it the record is read to find it."""
        with redis_errors():
            if tenant is None:
                raw = self.index.get(self._job_key(job_id))
                tenant = JobRecord.model_validate_json(raw).tenant if raw is not None else None
            pipe = self.index.pipeline()
            pipe.set(self.progress_key(job_id), f"{progress:.4f}|{stage[:200]}", ex=24 * 3600)
            if tenant is not None:  # else no list shows the job
                pipe.set(self.jobs_version_key(tenant), secrets.token_hex(8))
            pipe.execute()

    def list_jobs(
        self, tenant: str, limit: int, cursor: str | None, state: str | None = None, job_type: str | None = None,
        keep: Callable[[JobRecord], bool] | None = None, created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """A page of the tenant's jobs, newest first, that pass the filters (`keep` for any other test).

        The cursor is the last id examined: ids grow with time, so jobs added later never move a page. The
        creation-time bounds narrow the scanned id range itself (an id starts with its creation time), and
        records are read in batches, one Redis round trip per batch."""
        found: list[JobRecord] = []
        zset = f"{PREFIX}jobs:{tenant}"
        after = _decode_cursor(cursor)
        upper = f"({after}" if after else "+"
        # an id's time is within moments of its record's created_at: narrow the scan with a second of slack,
        # then compare created_at itself
        if created_before is not None:
            bound = f"jb_{int((created_before.timestamp() + 1) * 1e6):014x}"
            upper = f"({bound}" if upper == "+" or bound < upper[1:] else upper
        lower = "-" if created_after is None else f"[jb_{int((created_after.timestamp() - 1) * 1e6):014x}"
        last: str | None = None
        with redis_errors():
            filtered = bool(state or job_type or keep or created_after or created_before)
            while len(found) < limit:
                size = max(limit, 50) if filtered else limit - len(found)  # unfiltered: read only what is shown
                batch = [as_text(i) for i in self.index.zrevrangebylex(zset, upper, lower, start=0, num=size)]
                if not batch:
                    return found, None
                for record in self.get_jobs(batch, tenant):
                    last = record.id
                    if (state and record.state != state) or (job_type and record.type != job_type):
                        continue
                    if (created_after and record.created_at <= created_after) or (
                        created_before and record.created_at >= created_before
                    ):
                        continue
                    if keep is None or keep(record):
                        found.append(record)
                        if len(found) == limit:
                            break
                else:
                    last = batch[-1]  # the whole batch was examined (a vanished job included)
                upper = f"({last}"
            more = self.index.zrevrangebylex(zset, upper, lower, start=0, num=1)
        return found, (_encode_cursor(last) if more and last else None)

    def get_jobs(self, job_ids: list[str], tenant: str) -> list[JobRecord]:
        """The tenant's jobs among `job_ids`, in order, with live progress: one MGET for all of them (a job
        missing from the index is read from storage, as `get_job` does; one that is gone is skipped)."""
        with redis_errors():
            values = self.index.mget([k for i in job_ids for k in (self._job_key(i), self.progress_key(i))])
        records = []
        for n, job_id in enumerate(job_ids):
            raw, progress = values[2 * n], values[2 * n + 1]
            try:
                record = JobRecord.model_validate_json(raw) if raw is not None else self.get_job(job_id, tenant)
            except NotFound:
                continue
            if record.tenant != tenant:
                continue
            if progress is not None and record.state == "running":
                value, _, stage = as_text(progress).partition("|")
                record.progress, record.stage = max(record.progress, float(value)), stage
            records.append(record)
        return records

    # take a slot in the tenant's active set only while it has fewer than ARGV[2] members (one atomic step)
    _TAKE_SLOT = (
        "if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then return redis.call('SADD', KEYS[1], ARGV[1]) end "
        "return -1"
    )

    def reserve_job_slot(self, tenant: str, job_id: str, limit: int) -> None:
        """Count `job_id` as active before it is created, atomically, so concurrent submissions cannot all pass
        a count-then-create; QuotaExceeded when the tenant already has `limit` queued or running jobs. Members
        whose jobs have finished are pruned once before refusing, and so are reservations whose job was never
        created (a crashed request) once they are older than `STALE_RESERVATION_SECONDS`. `release_job_slot`
        undoes a reservation."""
        key = self.active_key(tenant)
        with redis_errors():
            for attempt in range(2):
                if self.index.eval(self._TAKE_SLOT, 1, key, job_id, limit) != -1:
                    return
                if attempt == 0:
                    for member in self.index.smembers(key):
                        try:
                            if self.get_job(as_text(member), tenant).state not in ACTIVE_STATES:
                                self.index.srem(key, member)
                        except NotFound:
                            # another submission's reservation, not yet created, unless it is long abandoned
                            if _id_age_seconds(as_text(member)) > STALE_RESERVATION_SECONDS:
                                self.index.srem(key, member)
        raise QuotaExceeded(f"at most {limit} queued or running jobs per tenant")

    def release_job_slot(self, tenant: str, job_id: str) -> None:
        with redis_errors():
            self.index.srem(self.active_key(tenant), job_id)

    def active_jobs(self, tenant: str) -> list[JobRecord]:
        with redis_errors():
            ids = [as_text(i) for i in self.index.smembers(self.active_key(tenant))]
        jobs = []
        for job_id in ids:
            try:
                jobs.append(self.get_job(job_id, tenant))
            except NotFound:
                continue
        return [job for job in jobs if job.state in ACTIVE_STATES]

    def claim_idempotency_key(self, tenant: str, key: str, job_id: str) -> str | None:
        """Reserve `key` for `job_id`. Returns the job id that already holds it, or None if reserved now."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        with redis_errors():
            slot = f"{PREFIX}idem:{tenant}:{digest}"
            if self.index.set(slot, job_id, nx=True, ex=7 * 24 * 3600):
                return None
            holder = self.index.get(slot)
        return as_text(holder) if holder else None

    def release_idempotency_key(self, tenant: str, key: str) -> None:
        digest = hashlib.sha256(key.encode()).hexdigest()
        with redis_errors():
            self.index.delete(f"{PREFIX}idem:{tenant}:{digest}")

    # -- pages and reindex --------------------------------------------------------------------------
    def _page(
        self, zset: str, limit: int, cursor: str | None, keep: Callable[[str], bool]
    ) -> tuple[list[str], str | None]:
        """Newest first, by id (ids are time-ordered). Scans in batches until `limit` ids are kept."""
        after = _decode_cursor(cursor)
        kept: list[str] = []
        last: str | None = None
        upper = f"({after}" if after else "+"
        with redis_errors():
            while len(kept) < limit:
                batch = [as_text(i) for i in self.index.zrevrangebylex(zset, upper, "-", start=0, num=max(limit, 50))]
                if not batch:
                    return kept, None
                for item in batch:
                    last = item
                    if keep(item):
                        kept.append(item)
                        if len(kept) == limit:
                            break
                upper = f"({last}"
            more = self.index.zrevrangebylex(zset, upper, "-", start=0, num=1)
        return kept, (_encode_cursor(last) if more and last else None)

    def reindex(self) -> dict[str, Any]:
        """Rebuild the Redis index from S3.

        Returns counts, and under `lost_jobs` the `(id, type)` of queued or running jobs that were missing
        from the index: their queue messages went with it, so the caller re-enqueues them (a copy of a job
        that is in fact still running is a no-op). Under `job_states` how many jobs there are of each
        `(tenant, state, type, method)`, from which the caller rebuilds the counts (`metrics.rebuild_counts`).
        """
        counts: dict[str, Any] = {"adapters": 0, "jobs": 0, "bytes": 0, "lost_jobs": [], "job_states": Counter()}
        byte_totals: dict[str, int] = {}
        for key in self.storage.list_keys("tenants/"):
            parts = key.split("/")
            if len(parts) != 5 or parts[4] != "record.json":
                continue
            tenant, kind = parts[1], parts[2]
            try:
                data: dict[str, Any] = self.storage.get_json(key)
            except (NotFound, json.JSONDecodeError):
                continue
            if kind in _RESOURCES:
                resource = _RESOURCES[kind][1].model_validate(data)
                self._index_resource(kind, resource)
                byte_totals[tenant] = byte_totals.get(tenant, 0) + resource.size_bytes
                counts[kind] = counts.get(kind, 0) + 1
            elif kind == "jobs":
                job = JobRecord.model_validate(data)
                with redis_errors():
                    exists = self.index.exists(self._job_key(job.id))
                if not exists:
                    self._index_job(job)
                    if job.state in ACTIVE_STATES:
                        counts["lost_jobs"].append((job.id, job.type))
                counts["jobs"] += 1
                counts["job_states"][(job.tenant, job.state, job.type, job.method)] += 1
        with redis_errors():
            for tenant, total in byte_totals.items():
                self.index.set(f"{PREFIX}bytes:{tenant}", total)
        counts["bytes"] = sum(byte_totals.values())
        return counts

    def is_index_empty(self) -> bool:
        with redis_errors():
            return not any(self.index.scan_iter(match=f"{PREFIX}*", count=100))


Resource = AdapterRecord | ModelRecord | DatasetRecord
_RESOURCES: dict[str, tuple[Callable[..., str], type[AdapterRecord] | type[ModelRecord] | type[DatasetRecord]]] = {
    "adapters": (keys.adapter, AdapterRecord),
    "models": (keys.model, ModelRecord),
    "datasets": (keys.dataset, DatasetRecord),
}
# the records of each kind that an active job reads (so they cannot be deleted under it)
_USED_BY: dict[str, Callable[[JobRecord], list[str]]] = {
    "adapters": JobRecord.input_adapter_ids,
    "models": JobRecord.input_model_ids,
    "datasets": JobRecord.input_dataset_ids,
}


def add_event(record: JobRecord, stage: str) -> None:
    record.stage = stage
    record.events.append(JobEvent(time=now(), state=record.state, progress=record.progress, stage=stage))
    del record.events[:-MAX_EVENTS]
