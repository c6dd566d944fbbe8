"""Observability through the real stack (redis-server, SeaweedFS, a Celery worker subprocess): a job's lines in
the worker's own log carry the submitting request's id, and `amend reindex` rebuilds the counts `GET /v1/stats`
reports."""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager

import pytest
import redis

from app.reindex import reindex_and_requeue
from tests.integration.conftest import upload_dir, wait_for_job

pytestmark = pytest.mark.integration


def merge_body(adapter_ids: list[str], method: str = "cat") -> dict:
    return {"type": "merge", "adapters": [{"id": i} for i in adapter_ids], "method": method,
            "output": {"name": "merged"}}


def worker_lines(stack, job_id: str) -> list[dict]:
    """The JSON lines the session's worker wrote for one job (its log file is the process's stderr)."""
    lines = []
    for text in (stack.root / "worker0.log").read_text().splitlines():
        if text.startswith("{"):
            entry = json.loads(text)
            if entry.get("job_id") == job_id:
                lines.append(entry)
    return lines


def test_a_jobs_lines_in_the_worker_carry_the_submitting_requests_id(stack, client, adapter_dir):
    adapter = upload_dir(client, adapter_dir("one", seed=1))["id"]
    trace = f"it-trace-{uuid.uuid4().hex[:12]}"
    submitted = client.post("/v1/jobs", json=merge_body([adapter]), headers={"X-Request-ID": trace})
    assert submitted.status_code == 202 and submitted.headers["x-request-id"] == trace
    job_id = submitted.json()["id"]
    assert wait_for_job(client, job_id)["state"] == "succeeded"
    other = client.post("/v1/jobs", json=merge_body([adapter]))  # a request id of its own, made by the API
    assert wait_for_job(client, other.json()["id"])["state"] == "succeeded"

    lines = worker_lines(stack, job_id)
    assert {"job started", "job succeeded"} <= {line["message"] for line in lines}, lines
    assert any(line["logger"] == "celery.app.trace" for line in lines)  # Celery's own "succeeded" line too
    # and its "received" line, written by the worker's main process before the job's record is read
    assert any(line["logger"] == "celery.worker.strategy" for line in lines), lines
    for line in lines:  # every line, not only the pipeline's own
        assert line["request_id"] == trace and line["tenant"] == "tenant-a", line
    others = worker_lines(stack, other.json()["id"])
    assert others and {line["request_id"] for line in others} == {other.headers["x-request-id"]}


@contextmanager
def as_other_tenant(client):
    original = client.headers["Authorization"]
    client.headers["Authorization"] = f"Bearer {client.other_key}"
    try:
        yield client
    finally:
        client.headers["Authorization"] = original


def test_reindex_rebuilds_the_job_counts_stats_reports(stack, client, adapter_dir):
    ids = [upload_dir(client, adapter_dir(name, seed=seed))["id"] for name, seed in (("a", 1), ("b", 2))]
    for _ in range(2):
        assert wait_for_job(client, client.post("/v1/jobs", json=merge_body(ids)).json()["id"])["state"] == "succeeded"
    raced = client.post("/v1/jobs", json=merge_body(ids)).json()["id"]
    client.post(f"/v1/jobs/{raced}/cancel")  # cancelled, queued or running; or succeeded if the worker was faster
    wait_for_job(client, raced)
    with as_other_tenant(client):
        theirs = client.post("/v1/jobs", json=merge_body([upload_dir(client, adapter_dir("c", seed=3))["id"]]))
        assert wait_for_job(client, theirs.json()["id"])["state"] == "succeeded"
        before_theirs = client.get("/v1/stats").json()["jobs"]
    before = client.get("/v1/stats").json()["jobs"]  # the session's bucket may hold earlier tests' jobs too
    assert before["succeeded"]["merge"] >= 2 and before_theirs == {"succeeded": {"merge": 1}}
    stored = sum(n for by_type in before.values() for n in by_type.values()) + 1

    redis.Redis.from_url(stack.redis_url).flushdb()  # Redis lost, and the counts with it
    assert client.get("/v1/stats").json()["jobs"] == {}
    counts = reindex_and_requeue(client.app.state.records, client.app.state.celery)
    assert counts["jobs"] == stored and counts.get("requeued", 0) == 0
    assert client.get("/v1/stats").json()["jobs"] == before
    with as_other_tenant(client):
        assert client.get("/v1/stats").json()["jobs"] == before_theirs
    # a second reindex over a full index sets the same counts again (it does not add them twice)
    reindex_and_requeue(client.app.state.records, client.app.state.celery)
    assert client.get("/v1/stats").json()["jobs"] == before
