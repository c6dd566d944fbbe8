"""Records without files — deletion requests, schedules, versions: the durable JSON in S3 under
`tenants/{tenant}/{kind}/{id}/record.json`, a copy in the Redis index, a per-tenant id list for pages.

The same contract as `app/records.py`: S3 first, then the index; `mutate` changes a record atomically (WATCH on
its index key, the durable copy written before the index commits); `reindex` rebuilds the index from S3 (called
by `app.reindex.reindex_and_requeue`, so `amend reindex` and an API starting on an empty index both run it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from pydantic import BaseModel

from app.errors import Conflict, NotFound
from app.records import PREFIX, Records, as_text, redis_errors

KINDS = ("requests", "schedules", "versions")
NOUNS = {"requests": "unlearning request", "schedules": "schedule", "versions": "version"}


D = TypeVar("D", bound=BaseModel)


def storage_key(kind: str, tenant: str, doc_id: str) -> str:
    return f"tenants/{tenant}/{kind}/{doc_id}/record.json"


def _index_key(kind: str, tenant: str, doc_id: str) -> str:
    return f"{PREFIX}{kind}:{tenant}:{doc_id}"


def list_key(kind: str, tenant: str) -> str:
    return f"{PREFIX}{kind}-list:{tenant}"


def put(records: Records, kind: str, record: Any) -> None:
    """Store a record (S3 first, then the index)."""
    records.storage.put_json(storage_key(kind, record.tenant, record.id), record.model_dump(mode="json"))
    _index(records, kind, record.tenant, record.id, record.model_dump_json())


def _index(records: Records, kind: str, tenant: str, doc_id: str, raw: str) -> None:
    with redis_errors():
        pipe = records.index.pipeline()
        pipe.set(_index_key(kind, tenant, doc_id), raw)
        pipe.zadd(list_key(kind, tenant), {doc_id: 0})
        pipe.execute()


def get(records: Records, kind: str, cls: type[D], tenant: str, doc_id: str) -> D:
    """The tenant's record; NotFound for a missing id and for another tenant's (the key names the tenant)."""
    with redis_errors():
        raw = records.index.get(_index_key(kind, tenant, doc_id))
    if raw is not None:
        return cls.model_validate_json(raw)
    try:
        data = records.storage.get_json(storage_key(kind, tenant, doc_id))
    except NotFound:
        raise NotFound(f"{NOUNS[kind]} {doc_id} not found") from None
    record = cls.model_validate(data)
    _index(records, kind, tenant, doc_id, record.model_dump_json())
    return record


def page(
    records: Records, kind: str, cls: type[D], tenant: str, limit: int, cursor: str | None,
    keep: Callable[[D], bool] | None = None,
) -> tuple[list[D], str | None]:
    """Newest first, cursor-paginated; `keep` filters (the scan goes on until `limit` records are kept)."""
    found: dict[str, D] = {}

    def kept(doc_id: str) -> bool:
        try:
            record = get(records, kind, cls, tenant, doc_id)
        except NotFound:
            return False
        if keep is not None and not keep(record):
            return False
        found[doc_id] = record
        return True

    ids, next_cursor = records._page(list_key(kind, tenant), limit, cursor, kept)
    return [found[i] for i in ids], next_cursor


def all_of(records: Records, kind: str, cls: type[D], tenant: str) -> list[D]:
    """Every record of this kind for the tenant, newest first."""
    with redis_errors():
        ids = [as_text(i) for i in cast(list[bytes], records.index.zrevrange(list_key(kind, tenant), 0, -1))]
    out = []
    for doc_id in ids:
        try:
            out.append(get(records, kind, cls, tenant, doc_id))
        except NotFound:
            continue
    return out


def mutate(records: Records, kind: str, cls: type[D], tenant: str, doc_id: str, change: Callable[[D], bool]) -> D:
    """Apply `change` atomically; it returns False to leave the record as it is (and may raise to refuse)."""
    get(records, kind, cls, tenant, doc_id)  # loads it into the index when only S3 has it
    key = _index_key(kind, tenant, doc_id)
    with redis_errors():
        for _ in range(50):
            with records.index.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.reset()
                        raise NotFound(f"{NOUNS[kind]} {doc_id} not found")
                    record = cls.model_validate_json(raw)
                    if not change(record):
                        return record
                    records.storage.put_json(storage_key(kind, tenant, doc_id), record.model_dump(mode="json"))
                    pipe.multi()
                    pipe.set(key, record.model_dump_json())
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue
    raise Conflict(f"{NOUNS[kind]} {doc_id} is being updated concurrently")


def delete(records: Records, kind: str, tenant: str, doc_id: str) -> None:
    records.storage.delete(storage_key(kind, tenant, doc_id))
    with redis_errors():
        pipe = records.index.pipeline()
        pipe.delete(_index_key(kind, tenant, doc_id))
        pipe.zrem(list_key(kind, tenant), doc_id)
        pipe.execute()


def reindex(records: Records) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Put every stored record of these kinds back in the index; returns them by kind as (tenant, data), for the
    kinds' own rebuilding (content keys of requests, redbeat entries of schedules)."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {kind: [] for kind in KINDS}
    for key in records.storage.list_keys("tenants/"):
        parts = key.split("/")
        if len(parts) != 5 or parts[4] != "record.json" or parts[2] not in KINDS:
            continue
        try:
            data = records.storage.get_json(key)
        except (NotFound, json.JSONDecodeError):
            continue
        _index(records, parts[2], parts[1], parts[3], json.dumps(data))
        found[parts[2]].append((parts[1], data))
    return found
