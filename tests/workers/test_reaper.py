"""The reaper finds jobs stranded by dead workers — and leaves alone those whose worker lives."""

from __future__ import annotations

import pytest

from app.queue import make_celery, queue_for
from app.records import Records, add_event, new_id, now
from app.schemas.jobs import JobRecord
from app.storage import Storage
from workers.lease import lease_key
from workers.reaper import delivered_key, reap_once, worker_key


@pytest.fixture
def records(unit_settings, redis_client, moto_s3):
    storage = Storage(unit_settings)
    storage.ensure_bucket()
    return Records(storage, redis_client)


@pytest.fixture
def celery(unit_settings):
    return make_celery(unit_settings, "test-reaper")


def job(records: Records, state: str) -> str:
    record = JobRecord(id=new_id("jb"), tenant="t", type="merge", method="cat", state=state, progress=0.0,
                       stage=state, created_at=now(), spec={"adapters": []}, attempts=1 if state == "running" else 0)
    add_event(record, state)
    records.create_job(record)
    return record.id


def queued_messages(redis_client) -> int:
    return redis_client.llen(queue_for("merge"))


def test_running_job_without_lease_is_requeued_once(records, celery, redis_client):
    alive, dead = job(records, "running"), job(records, "running")
    redis_client.set(lease_key(alive), "token", ex=30)
    assert reap_once(records, celery) == [dead]
    assert queued_messages(redis_client) == 1
    assert reap_once(records, celery) == []  # one re-enqueue per attempt


def test_queued_job_delivered_to_a_dead_worker_is_requeued(records, celery, redis_client):
    on_live, on_dead, waiting = job(records, "queued"), job(records, "queued"), job(records, "queued")
    redis_client.set(worker_key("w-live"), "1", ex=30)
    redis_client.set(delivered_key(on_live), "w-live")
    redis_client.set(delivered_key(on_dead), "w-dead")
    assert reap_once(records, celery) == [on_dead]
    assert not redis_client.exists(delivered_key(on_dead))
    assert queued_messages(redis_client) == 1
    assert waiting not in reap_once(records, celery)


def test_finished_jobs_are_never_touched(records, celery, redis_client):
    done = job(records, "succeeded")
    redis_client.set(delivered_key(done), "w-dead")
    assert reap_once(records, celery) == []
