"""A worker's storage and Redis errors reach `/metrics` (`amend_worker_backend_errors_total`), read with
prometheus_client's own parser: storage stopped under a running job, then Redis stopped under an idle worker,
whose errors are counted once Redis is back."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import upload_dir, wait_for_job
from tests.reliability.conftest import WORKER_APP, wait_until

pytestmark = pytest.mark.reliability


def worker_errors(client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return {sample.labels["backend"]: sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples if sample.name == "amend_worker_backend_errors_total"}


def test_a_workers_storage_and_redis_errors_move_the_counter(rstack, rclient, adapter_dir):
    adapter = upload_dir(rclient, adapter_dir("a", seed=1))["id"]
    rstack.start_worker(app=WORKER_APP, extra_env={"AMEND_TEST_SLOW_STEPS": "15",
                                                   "AMEND_WORKER_HEARTBEAT_SECONDS": "1"})
    assert worker_errors(rclient) == {"redis": 0, "storage": 0}  # both series exist before any error
    body = {"type": "merge", "adapters": [{"id": adapter}], "method": "task_arithmetic",
            "output": {"name": "slow-errors", "rank": 4}}
    job_id = rclient.post("/v1/jobs", json=body).json()["id"]
    wait_until(lambda: rclient.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 60, "the job to start")

    rstack.s3.stop()
    wait_until(lambda: worker_errors(rclient)["storage"] >= 1, 60, "the worker's storage error on /metrics")
    rstack.start_s3()
    assert wait_for_job(rclient, job_id, timeout=120)["state"] == "succeeded"
    counted = worker_errors(rclient)
    assert counted["redis"] == 0  # the API's own errors are not the workers'

    rstack.stop_redis()  # the worker's heartbeat fails every second while Redis is away
    time.sleep(3)
    rstack.start_redis()
    errors = wait_until(lambda: (e := worker_errors(rclient))["redis"] >= 1 and e, 30,
                        "the worker's Redis errors, kept while Redis was away, on /metrics")
    assert errors["storage"] >= counted["storage"]
