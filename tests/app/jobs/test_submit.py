"""Admission without HTTP (what a scheduler calls): checks, idempotency, quota slot, record, enqueue — and
nothing left behind when a check refuses."""

from __future__ import annotations

import json

import pytest

from app.errors import Conflict, NotFound, QuotaExceeded
from app.jobs.submit import submit
from app.schemas.jobs import job_create_adapter
from tests.app.test_api import upload


class SentTasks:
    """Stands in for the Celery app's `send_task`: records what would go on the queue."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list, str]] = []
        self.log_context: list[dict] = []  # what each message's kwargsrepr carries for the worker's log lines

    def send_task(self, name: str, args: list, queue: str, kwargsrepr: str = "") -> None:
        self.sent.append((name, args, queue))
        self.log_context.append(json.loads(kwargsrepr))


@pytest.fixture
def spec(api, adapter_dir):
    ids = [upload(api, adapter_dir(n, seed=s), n).json()["id"] for n, s in (("one", 1), ("two", 2))]
    return job_create_adapter.validate_python(
        {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "task_arithmetic",
         "output": {"name": "merged", "rank": 4}}
    )


def test_submit_creates_queues_and_is_idempotent(api, spec):
    records, settings, celery = api.app.state.records, api.app.state.settings, SentTasks()
    first = submit(records, settings, celery, "tenant-a", spec, idempotency_key="k1")
    assert first.created and first.job.state == "queued" and first.job.events[-1].stage == "queued"
    assert records.get_job(first.job.id, "tenant-a").state == "queued"
    assert celery.sent == [("workers.run_job", [first.job.id], "amend.merge")]
    assert celery.log_context == [{"job_id": first.job.id, "tenant": "tenant-a"}]  # no request outside the API
    again = submit(records, settings, celery, "tenant-a", spec, idempotency_key="k1")
    assert not again.created and again.job.id == first.job.id and len(celery.sent) == 1
    other = spec.model_copy(update={"method": "cat", "params": {}})
    with pytest.raises(Conflict):
        submit(records, settings, celery, "tenant-a", other, idempotency_key="k1")


def test_a_refused_submission_leaves_no_job_slot_or_key(api, spec):
    records, settings, celery = api.app.state.records, api.app.state.settings, SentTasks()
    missing = spec.model_copy(update={"adapters": [*spec.adapters[:1], spec.adapters[1].model_copy(
        update={"id": "ad_" + "0" * 26})]})
    with pytest.raises(NotFound):
        submit(records, settings, celery, "tenant-a", missing, idempotency_key="k2")
    assert records.active_jobs("tenant-a") == [] and celery.sent == []
    # the key is free again: the same key now admits a valid request
    assert submit(records, settings, celery, "tenant-a", spec, idempotency_key="k2").created


def test_the_quota_slot_is_taken_at_admission(api, spec):
    records, celery = api.app.state.records, SentTasks()
    settings = api.app.state.settings.model_copy(update={"max_jobs_per_tenant": 1})
    submit(records, settings, celery, "tenant-a", spec)
    with pytest.raises(QuotaExceeded):
        submit(records, settings, celery, "tenant-a", spec)
    assert len(celery.sent) == 1


def test_the_request_hash_ignores_key_order_but_not_pattern_order():
    from app.jobs.submit import request_hash

    one = {"type": "merge", "output": {"name": "m", "rank_pattern": {"q_proj": 2, r"layers\.0\..*": 8}}}
    same = {"output": {"rank_pattern": {"q_proj": 2, r"layers\.0\..*": 8}, "name": "m"}, "type": "merge"}
    swapped = {"type": "merge", "output": {"name": "m", "rank_pattern": {r"layers\.0\..*": 8, "q_proj": 2}}}
    assert request_hash(one) == request_hash(same)
    assert request_hash(one) != request_hash(swapped)
