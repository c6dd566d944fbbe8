"""Annotated dependencies, so route signatures read like sentences: the settings, the services, the
caller's tenant from the API key, and records that answer 404 when missing or another tenant's."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app import logs
from app.errors import Forbidden, IndexUnavailable, Unauthorized
from app.records import Records
from app.schemas.adapters import AdapterRecord
from app.schemas.jobs import ID_PATTERN, JobRecord
from app.settings import ApiKey, Settings, hash_key


@dataclass(frozen=True)
class Caller:
    tenant: str
    scopes: frozenset[str]


# async: they do no I/O, so FastAPI calls them on the event loop instead of a threadpool hop each (a job GET
# had five such hops; they cost more than its Redis round trip)
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_records(request: Request) -> Records:
    return request.app.state.records


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
RecordsDep = Annotated[Records, Depends(get_records)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def authenticate(authorization: str, api_keys: dict[str, ApiKey]) -> Caller:
    """The caller named by an `Authorization: Bearer <key>` header; Unauthorized otherwise."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(token.strip())
    for known_digest, key in api_keys.items():
        if hmac.compare_digest(known_digest, digest):
            return Caller(tenant=key.tenant, scopes=key.scopes)
    raise Unauthorized("invalid API key")


# declares the Bearer scheme in the OpenAPI spec for every route that needs a caller; `authenticate` checks
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


async def get_caller(
    request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    caller = authenticate(request.headers.get("authorization", ""), request.app.state.api_keys)
    logs.bind(tenant=caller.tenant)
    return caller


def _scoped(scope: str):  # type: ignore[no-untyped-def]
    async def check(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        if scope not in caller.scopes and "admin" not in caller.scopes:
            raise Forbidden(f"this API key lacks the '{scope}' scope")
        return caller

    return check


Reader = Annotated[Caller, Depends(_scoped("read"))]
Writer = Annotated[Caller, Depends(_scoped("write"))]
Admin = Annotated[Caller, Depends(_scoped("admin"))]

AdapterId = Annotated[str, Path(pattern=ID_PATTERN, max_length=48)]
JobId = Annotated[str, Path(pattern=ID_PATTERN, max_length=48)]


def get_adapter(adapter_id: AdapterId, caller: Reader, records: RecordsDep) -> AdapterRecord:
    return records.get_adapter(caller.tenant, adapter_id)


async def get_job(job_id: JobId, caller: Reader, records: RecordsDep, request: Request) -> JobRecord:
    """The hot path of polling: one MGET on the app's asyncio Redis client, on the event loop (no threadpool
    hop); a job missing from the index is read from storage in the threadpool, as `Records.get_job` does."""
    logs.bind(job_id=job_id)
    index = getattr(request.app.state, "aindex", None)
    if index is None:  # an app used without its lifespan (no asyncio client)
        return await run_in_threadpool(records.get_job, job_id, caller.tenant)
    try:
        raw, progress = await index.mget(*records.job_keys(job_id))
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise IndexUnavailable("the Redis index is unavailable; retry shortly") from error
    if raw is None:
        return await run_in_threadpool(records.get_job, job_id, caller.tenant)
    return records.job_from_index(job_id, JobRecord.model_validate_json(raw), progress, caller.tenant)


AdapterDep = Annotated[AdapterRecord, Depends(get_adapter)]
JobDep = Annotated[JobRecord, Depends(get_job)]
