"""Records: durable in S3 (moto here), indexed in Redis (a real redis-server); the index is disposable."""

from __future__ import annotations

import pytest

from app.errors import NotFound
from app.records import Records, add_event, new_id, now
from app.schemas.adapters import AdapterRecord
from app.schemas.jobs import JobRecord
from app.storage import Storage


@pytest.fixture
def records(unit_settings, redis_client, moto_s3):
    storage = Storage(unit_settings)
    storage.ensure_bucket()
    return Records(storage, redis_client)


def adapter(tenant: str, **extra) -> AdapterRecord:
    return AdapterRecord(
        id=new_id("ad"), tenant=tenant, name="x", base_model="b", rank=4, alpha=8.0, target_modules=["q_proj"],
        n_modules=2, dtype="F32", size_bytes=100, sha256="0" * 64, config_sha256="1" * 64, created_at=now(),
        **extra,
    )


def job(tenant: str, state: str = "queued") -> JobRecord:
    record = JobRecord(id=new_id("jb"), tenant=tenant, type="merge", method="cat", state=state, progress=0.0,
                       stage=state, created_at=now(), spec={"adapters": []})
    add_event(record, state)
    return record


def test_ids_are_time_ordered_and_well_formed():
    ids = [new_id("jb") for _ in range(50)]
    times = [i[3:17] for i in ids]  # 14 hex digits of microseconds, then randomness
    assert times == sorted(times) and len(set(ids)) == 50
    assert all(len(i) == 27 and i.startswith("jb_") for i in ids)


def test_adapter_index_falls_back_to_storage_and_respects_tenants(records, redis_client):
    record = adapter("t1")
    records.put_adapter(record)
    redis_client.flushdb()  # the index is lost; the durable copy answers
    assert records.get_adapter("t1", record.id) == record
    with pytest.raises(NotFound):
        records.get_adapter("t2", record.id)


def test_mutate_job_writes_both_copies(records):
    record = job("t1")
    records.create_job(record)

    def start(r: JobRecord) -> bool:
        r.state, r.attempts = "running", r.attempts + 1
        return True

    records.mutate_job(record.id, start)
    durable = records.storage.get_json(f"tenants/t1/jobs/{record.id}/record.json")
    assert durable["state"] == "running" and durable["attempts"] == 1
    assert [j.id for j in records.active_jobs("t1")] == [record.id]
    records.mutate_job(record.id, lambda r: setattr(r, "state", "succeeded") or True)
    assert records.active_jobs("t1") == []


def test_progress_is_live_only_while_running(records):
    record = job("t1", "running")
    records.create_job(record)
    records.set_progress(record.id, 0.5, "half way")
    live = records.get_job(record.id, "t1")
    assert (live.progress, live.stage) == (0.5, "half way")


def test_reindex_rebuilds_adapters_jobs_bytes_and_lists_lost_active_jobs(records, redis_client):
    adapters = [adapter("t1") for _ in range(3)]
    for a in adapters:
        records.put_adapter(a)
    done, waiting = job("t1", "succeeded"), job("t1", "queued")
    records.create_job(done)
    records.create_job(waiting)
    redis_client.flushdb()
    assert records.is_index_empty()
    result = records.reindex()
    assert result["adapters"] == 3 and result["jobs"] == 2 and result["bytes"] == 300
    assert result["lost_jobs"] == [(waiting.id, "merge")]
    listed, cursor = records.list_adapters("t1", 10, None)
    assert [a.id for a in listed] == [a.id for a in reversed(adapters)] and cursor is None
    assert records.stored_bytes("t1") == 300
    again = records.reindex()
    assert again["lost_jobs"] == []  # already indexed: nothing to re-enqueue twice


def test_a_write_that_loses_the_race_to_a_final_state_does_not_stay_in_storage(records):
    """A worker starts a job while the API cancels it: the cancel commits first, the start's retry finds nothing
    left to do. The start had already written its `running` copy to S3; the winner's record must replace it, or
    `reindex` would bring back a running job and run it again."""
    record = job("t1")
    records.create_job(record)
    durable = f"tenants/t1/jobs/{record.id}/record.json"

    def cancel(current: JobRecord) -> bool:
        current.state = "cancelled"
        return True

    def start(current: JobRecord) -> bool:
        if current.state != "queued":
            return False
        current.state = "running"
        records.mutate_job(record.id, cancel)  # the concurrent writer, between this read and this commit
        return True

    assert records.mutate_job(record.id, start).state == "cancelled"
    assert records.storage.get_json(durable)["state"] == "cancelled"
    assert records.get_job(record.id).state == "cancelled"
