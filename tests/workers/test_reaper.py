"""The reaper finds jobs stranded by dead workers — and leaves alone those whose worker lives."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis

from app.queue import enqueue, make_celery, queue_for
from app.records import Records, add_event, new_id, now
from app.schemas.jobs import JobRecord
from app.storage import Storage
from workers.upkeep.lease import lease_key
from workers.upkeep.reaper import reap_once


@pytest.fixture
def isolated(unit_settings, redis_url):
    """A Redis database of its own: the integration stack's worker consumes the queues of database 0."""
    settings = unit_settings.model_copy(update={"redis_url": redis_url.rsplit("/", 1)[0] + "/7"})
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    yield settings, client
    client.flushdb()
    client.close()


@pytest.fixture
def records(isolated, moto_s3):
    settings, client = isolated
    storage = Storage(settings)
    storage.ensure_bucket()
    return Records(storage, client)


@pytest.fixture
def celery(isolated):
    return make_celery(isolated[0], "test-reaper")


def job(records: Records, state: str, age: float = 0.0) -> str:
    record = JobRecord(id=new_id("jb"), tenant="t", type="merge", method="cat", state=state, progress=0.0,
                       stage=state, created_at=now() - timedelta(seconds=age), spec={"adapters": []},
                       attempts=1 if state == "running" else 0)
    add_event(record, state)
    records.create_job(record)
    return record.id


def queued_messages(redis_client) -> int:
    return redis_client.llen(queue_for("merge"))


def test_running_job_without_lease_is_requeued_once(records, celery, isolated):
    redis_client = isolated[1]
    alive, dead = job(records, "running"), job(records, "running")
    redis_client.set(lease_key(alive), "token", ex=30)
    assert reap_once(records, celery, lease_seconds=30) == [dead]
    assert queued_messages(redis_client) == 1
    assert reap_once(records, celery, lease_seconds=30) == []  # one re-enqueue per attempt


def test_queued_job_whose_delivery_was_never_acked_is_requeued(records, celery, isolated):
    redis_client = isolated[1]
    stranded, waiting = job(records, "queued"), job(records, "queued")
    enqueue(celery, stranded, "merge")
    connection = celery.connection_for_read()
    consumer = connection.SimpleQueue(queue_for("merge"))
    message = consumer.get(timeout=5)  # delivered and never acked: its worker "died" holding it
    assert message.payload  # the message really left the queue
    enqueue(celery, waiting, "merge")  # still in the queue: not stranded
    assert queued_messages(redis_client) == 1
    assert reap_once(records, celery, lease_seconds=30) == []  # too recent to call it stranded
    time.sleep(0.2)
    assert reap_once(records, celery, lease_seconds=0.05) == [stranded]
    assert queued_messages(redis_client) == 2
    assert reap_once(records, celery, lease_seconds=0.05) == []  # one re-enqueue per delivery
    connection.release()


def test_finished_jobs_are_never_touched(records, celery, isolated):
    redis_client = isolated[1]
    done = job(records, "succeeded")
    enqueue(celery, done, "merge")
    connection = celery.connection_for_read()
    assert connection.SimpleQueue(queue_for("merge")).get(timeout=5).payload  # an unacked stale copy
    time.sleep(0.2)
    assert reap_once(records, celery, lease_seconds=0.05) == []
    assert queued_messages(redis_client) == 0
    connection.release()


def test_a_queued_job_whose_message_is_nowhere_is_requeued(records, celery, isolated):
    """A worker killed between kombu's pop of a message and its unacked bookkeeping loses the message: the
    job stays queued with no message anywhere. The reaper re-enqueues such a job once it is old enough."""
    redis_client = isolated[1]
    lost = job(records, "queued", age=300)
    delivered = job(records, "queued", age=300)
    enqueue(celery, delivered, "merge")
    waiting = job(records, "queued", age=300)
    enqueue(celery, waiting, "merge")  # its message waits in the queue
    connection = celery.connection_for_read()
    consumer = connection.SimpleQueue(queue_for("merge"))  # kept open: closing it would restore the message
    assert consumer.get(timeout=5).payload  # the first message, `delivered`'s: unacked, not lost
    young = job(records, "queued")  # just created: its message may still be on its way
    assert young and queued_messages(redis_client) == 1
    assert reap_once(records, celery, lease_seconds=30, orphan_age=60) == [lost]
    assert queued_messages(redis_client) == 2
    assert reap_once(records, celery, lease_seconds=30, orphan_age=60) == []  # its message is queued now
    # once old enough, the young job (which never had a message) is re-enqueued too; `lost`, whose new
    # message vanished as well, waits: at most one re-enqueue per job per orphan_age
    redis_client.delete(queue_for("merge"))
    enqueue(celery, waiting, "merge")
    time.sleep(1.1)
    assert reap_once(records, celery, lease_seconds=30, orphan_age=1) == [young]
    consumer.close()
    connection.release()
