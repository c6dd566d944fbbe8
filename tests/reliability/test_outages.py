"""Redis and storage go away and come back: the API says so clearly, nothing is lost or half-written."""

from __future__ import annotations

import io

import pytest

from app.reindex import reindex_and_requeue
from tests.integration.conftest import upload_dir, wait_for_job
from tests.reliability.conftest import WORKER_APP, wait_until

pytestmark = pytest.mark.reliability


def merge_body(adapter_ids, name="merged"):
    return {"type": "merge", "adapters": [{"id": i} for i in adapter_ids], "method": "task_arithmetic",
            "output": {"name": name, "rank": 4}}


def test_redis_restarted_empty_api_503_then_reindex_restores_everything(rstack, rclient, adapter_dir):
    ids = [upload_dir(rclient, adapter_dir(n, seed=s))["id"] for n, s in (("a", 1), ("b", 2))]
    queued = rclient.post("/v1/jobs", json=merge_body(ids)).json()["id"]  # no worker yet: stays queued

    rstack.stop_redis(wipe=True)
    down = rclient.get("/v1/adapters")
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "redis_unavailable"
    assert rclient.get("/readyz").status_code == 503

    rstack.start_redis()  # same port, no data: the queue message and the index are gone
    wait_until(lambda: rclient.get("/readyz").status_code == 200, 30, "the API to recover by itself")
    assert rclient.get("/v1/adapters").json()["items"] == []
    counts = reindex_and_requeue(rclient.app.state.records, rclient.app.state.celery)
    assert counts["adapters"] == 2 and counts["jobs"] == 1 and counts["requeued"] == 1
    assert {a["id"] for a in rclient.get("/v1/adapters").json()["items"]} == set(ids)

    rstack.start_worker(app=WORKER_APP)
    assert wait_for_job(rclient, queued, timeout=120)["state"] == "succeeded"


def test_storage_down_upload_is_503_and_leaves_nothing(rstack, rclient, adapter_dir):
    directory = adapter_dir("a", seed=1)
    rstack.s3.stop()
    files = {
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", io.BytesIO((directory / "adapter_model.safetensors").read_bytes())),
    }
    response = rclient.post("/v1/adapters", files=files)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_unavailable"
    rstack.start_s3()
    assert list(rclient.app.state.records.storage.list_keys("tenants/")) == []
    assert rclient.get("/v1/adapters").json()["items"] == []


def test_storage_down_during_result_write_job_retries_then_succeeds(rstack, rclient, adapter_dir):
    ids = [upload_dir(rclient, adapter_dir("a", seed=1))["id"]]
    rstack.start_worker(app=WORKER_APP, extra_env={"AMEND_TEST_SLOW_STEPS": "15"})
    job_id = rclient.post("/v1/jobs", json=merge_body(ids, "slow-storage")).json()["id"]
    wait_until(lambda: rclient.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 60, "the job to start")
    rstack.s3.stop()
    wait_until(lambda: "unreachable; retrying" in rclient.get(f"/v1/jobs/{job_id}").json()["stage"], 60,
               "the worker to notice storage is down")
    rstack.start_s3()
    done = wait_for_job(rclient, job_id, timeout=120)
    assert done["state"] == "succeeded", done
    adapter = rclient.get(f"/v1/adapters/{done['result']['adapter_id']}")
    assert adapter.status_code == 200
    weights = rclient.get(f"/v1/adapters/{done['result']['adapter_id']}/files/adapter_model.safetensors")
    assert len(weights.content) == adapter.json()["size_bytes"]
