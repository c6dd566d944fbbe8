"""`/metrics`: Prometheus text that prometheus_client's own parser reads, counters that move with jobs (the
lifecycle listener writes them to Redis, so worker processes count too), latency by route template, and the
settings that turn it off or protect it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from tests.app.test_api import upload
from tests.conftest import tenant_keys
from tests.workers.jobs.test_run import run_in_process


@pytest.fixture
def merge_job(api, adapter_dir):
    ids = [upload(api, adapter_dir(name, seed=seed), name).json()["id"] for name, seed in (("one", 1), ("two", 2))]
    body = {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "task_arithmetic",
            "output": {"name": "merged", "rank": 4}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"], ids


def scrape(client: TestClient, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers={"Authorization": "", **headers})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_jobs(api, merge_job):
    job_id, _ = merge_job
    merge = {"type": "merge", "method": "task_arithmetic"}
    before = scrape(api)
    assert value(before, "amend_jobs_submitted_total", **merge) == 1
    assert value(before, "amend_jobs_running", **merge) == 0
    assert value(before, "amend_redis_up") == 1
    assert value(before, "amend_queue_depth", queue="amend.merge") == 1  # enqueued, no worker here

    job = run_in_process(api, job_id)
    assert job.state == "succeeded"
    after = scrape(api)
    assert value(after, "amend_jobs_finished_total", outcome="succeeded", **merge) == 1
    assert value(after, "amend_jobs_running", **merge) == 0
    assert value(after, "amend_job_duration_seconds_count", **merge) == 1
    assert value(after, "amend_job_duration_seconds_bucket", le="+Inf", **merge) == 1
    assert value(after, "amend_job_queue_wait_seconds_count", **merge) == 1
    assert value(after, "amend_job_duration_seconds_sum", **merge) > 0

    # a second job, cancelled while queued: submitted 2, cancelled 1, no duration for it
    spec = api.get(f"/v1/jobs/{job_id}").json()["spec"]
    assert api.post("/v1/jobs", json=spec).status_code == 202
    second = api.get("/v1/jobs", params={"state": "queued"}).json()["items"][0]["id"]
    assert api.post(f"/v1/jobs/{second}/cancel").status_code == 200
    last = scrape(api)
    assert value(last, "amend_jobs_submitted_total", **merge) == 2
    assert value(last, "amend_jobs_finished_total", outcome="cancelled", **merge) == 1
    assert value(last, "amend_job_duration_seconds_count", **merge) == 1


def test_request_latency_is_labelled_by_route_template_not_by_id(api, merge_job):
    job_id, _ = merge_job
    for _ in range(3):
        assert api.get(f"/v1/jobs/{job_id}").status_code == 200
    assert api.get("/v1/jobs/jb_00000000000000deadbeef00").status_code == 404
    samples = scrape(api)
    template = {"method": "GET", "route": "/v1/jobs/{job_id}"}
    assert value(samples, "amend_http_request_duration_seconds_count", status="200", **template) == 3
    assert value(samples, "amend_http_request_duration_seconds_count", status="404", **template) == 1
    assert not any(job_id in str(key) for key in samples)


def test_metrics_can_be_protected_or_turned_off(redis_url, redis_client, moto_s3):
    _, _, api_keys = tenant_keys()
    base = {"environment": "test", "redis_url": redis_url, "s3_bucket": "unit", "api_keys": api_keys}
    with TestClient(create_app(Settings(**base, metrics_token="scrape-secret"))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert "amend_redis_up" in client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).text
    with TestClient(create_app(Settings(**base, metrics_enabled=False))) as client:
        assert client.get("/metrics").status_code == 404


def test_the_grafana_dashboard_uses_only_metrics_that_exist(api, merge_job):
    import json
    import re
    from pathlib import Path

    job_id, _ = merge_job
    run_in_process(api, job_id)
    api.get(f"/v1/jobs/{job_id}")
    text = api.get("/metrics", headers={"Authorization": ""}).text
    exported = {family.name for family in text_string_to_metric_families(text)}  # declared, even with no samples
    dashboard = json.loads(Path("docker/grafana/amend-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"amend_[a-z_]+", target["expr"])}
    bases = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert bases and bases <= exported, bases - exported


def test_stats_count_the_callers_jobs_by_state_and_type(api, merge_job):
    job_id, _ = merge_job
    assert api.get("/v1/stats").json()["jobs"] == {"queued": {"merge": 1}}
    run_in_process(api, job_id)
    stats = api.get("/v1/stats").json()
    assert stats["jobs"] == {"succeeded": {"merge": 1}}
    assert "amend.merge" in stats["queues"] and isinstance(stats["workers"], list)
