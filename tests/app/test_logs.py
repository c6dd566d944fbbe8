"""Structured logs: JSON lines carrying the request id (returned in `X-Request-ID`), the tenant and the job id
on every line of a request, and the job id and tenant on a job's lines in a worker; keys never logged."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi.testclient import TestClient

from app import logs
from app.main import create_app
from app.settings import Settings
from tests.conftest import tenant_keys


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = logging.getLogger("amend.access").level
    logging.getLogger("amend.access").setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    root.removeHandler(handler)
    logging.getLogger("amend.access").setLevel(level)


@pytest.fixture
def api(redis_url, redis_client, moto_s3):
    key_a, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        client.key = key_a  # type: ignore[attr-defined]
        yield client


def test_every_request_has_an_id_in_its_response_and_its_log_lines(api, captured):
    missing = "jb_0123456789abcdef01234567"
    response = api.get(f"/v1/jobs/{missing}", headers={"X-Request-ID": "trace-42"})
    assert response.status_code == 404 and response.headers["x-request-id"] == "trace-42"
    generated = api.get("/healthz", headers={"X-Request-ID": "no spaces or <tags> allowed"}).headers["x-request-id"]
    assert generated.startswith("req_") and len(generated) == 20
    assert api.get("/healthz").headers["x-request-id"] != generated
    lines = [line for line in captured() if line.get("request_id") == "trace-42"]
    access = [line for line in lines if line["logger"] == "amend.access"]
    assert access and access[0] | {"duration_ms": 0} == access[0] | {
        "message": "request", "method": "GET", "route": "/v1/jobs/{job_id}", "status": 404,
        "tenant": "tenant-a", "job_id": missing, "duration_ms": 0}
    assert all(api.key not in json.dumps(line) for line in captured())  # the API key is never logged


def test_a_submitted_job_logs_with_its_id_and_tenant(api, captured, adapter_dir):
    from tests.app.test_api import upload

    adapter = upload(api, adapter_dir("one", seed=1), "one").json()["id"]
    response = api.post("/v1/jobs", json={"type": "merge", "adapters": [{"id": adapter}], "method": "cat"})
    job_id, request_id = response.json()["id"], response.headers["x-request-id"]
    line = next(line for line in captured() if line.get("request_id") == request_id)
    assert line["job_id"] == job_id and line["tenant"] == "tenant-a"


def test_a_jobs_lines_in_a_worker_carry_its_id_and_tenant(captured):
    log = logging.getLogger("workers.test")
    with logs.context(job_id="jb_1", request_id="celery-message-id"):
        logs.bind(tenant="tenant-a")  # run_job binds the tenant once it has read the record
        log.info("job started", extra={"attempt": 1})
    log.info("outside any job")
    inside, outside = captured()[-2:]
    assert inside | {"time": 0} == {"time": 0, "level": "INFO", "logger": "workers.test", "message": "job started",
                                    "job_id": "jb_1", "request_id": "celery-message-id", "tenant": "tenant-a",
                                    "attempt": 1}
    assert "job_id" not in outside and "tenant" not in outside


def test_celerys_received_line_takes_the_job_context_its_message_carries():
    """The worker's main process logs "received" before any job context exists: the context comes from the
    message's kwargsrepr (app.queue.enqueue); a kwargsrepr that is not that JSON, or another logger, adds nothing."""
    formatter = logs.JsonFormatter()

    def line(name: str, kwargs: str) -> dict:
        record = logging.LogRecord(name, logging.INFO, "", 0, "Task %(name)s[%(id)s] received", None, None)
        record.data = {"id": "t1", "name": "amend.run_job", "args": "['jb_1']", "kwargs": kwargs}
        return json.loads(formatter.format(record))

    carried = json.dumps({"job_id": "jb_1", "tenant": "tenant-a", "request_id": "req_1"})
    entry = line("celery.worker.strategy", carried)
    assert (entry["job_id"], entry["tenant"], entry["request_id"]) == ("jb_1", "tenant-a", "req_1")
    for name, kwargs in (("celery.worker.strategy", "{}"), ("celery.worker.strategy", "{'a': 1}"),
                         ("celery.worker.strategy", "[1]"), ("other.logger", carried)):
        assert not {"job_id", "tenant", "request_id"} & set(line(name, kwargs)), (name, kwargs)
