"""Workers die, get stopped or meet a poison job: every job still ends exactly once."""

from __future__ import annotations

import signal

import pytest

from tests.integration.conftest import upload_dir, wait_for_job
from tests.reliability.conftest import WORKER_APP, wait_until

pytestmark = pytest.mark.reliability


def submit(client, adapter_ids, name):
    body = {"type": "merge", "adapters": [{"id": i} for i in adapter_ids], "method": "task_arithmetic",
            "output": {"name": name, "rank": 4}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def outputs_of(client, job_id):
    """Adapter records and stored objects that a job produced."""
    records = client.app.state.records
    adapters = [a for a in client.get("/v1/adapters", params={"limit": 200}).json()["items"]
                if a["source_job_id"] == job_id]
    objects = [k for k in records.storage.list_keys("tenants/") if "/adapters/ad_" + job_id.split("_", 1)[1] in k]
    return adapters, objects


def test_worker_killed_mid_job_completes_exactly_once(rstack, rclient, adapter_dir):
    ids = [upload_dir(rclient, adapter_dir(n, seed=s))["id"] for n, s in (("a", 1), ("b", 2))]
    first = rstack.start_worker(app=WORKER_APP)
    job_id = submit(rclient, ids, "slow-kill")
    wait_until(lambda: rclient.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 60, "the job to start")
    first.signal(signal.SIGKILL)
    first.process.wait(10)
    rstack.start_worker(app=WORKER_APP)
    done = wait_for_job(rclient, job_id, timeout=120)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2
    adapters, objects = outputs_of(rclient, job_id)
    assert len(adapters) == 1
    assert sorted(o.rsplit("/", 1)[1] for o in objects) == [
        "adapter_config.json", "adapter_model.safetensors", "record.json"
    ]


def test_sigterm_finishes_the_running_job(rstack, rclient, adapter_dir):
    ids = [upload_dir(rclient, adapter_dir("a", seed=1))["id"]]
    worker = rstack.start_worker(app=WORKER_APP)
    job_id = submit(rclient, ids, "slow-term")
    wait_until(lambda: rclient.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 60, "the job to start")
    worker.signal(signal.SIGTERM, group=False)  # warm shutdown: the running job finishes first
    worker.process.wait(60)
    job = rclient.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1


def test_poison_job_fails_for_good_and_the_queue_moves_on(rstack, rclient, adapter_dir):
    ids = [upload_dir(rclient, adapter_dir("a", seed=1))["id"]]
    rstack.start_worker(app=WORKER_APP)
    poison = submit(rclient, ids, "poison")
    healthy = submit(rclient, ids, "fine")
    done = wait_for_job(rclient, poison, timeout=150)
    assert done["state"] == "failed", done
    assert done["error"]["code"] == "worker_crashed"
    assert done["attempts"] == 3
    assert wait_for_job(rclient, healthy, timeout=120)["state"] == "succeeded"


def test_cancel_running_job_stops_it_and_releases_adapters(rstack, rclient, adapter_dir):
    ids = [upload_dir(rclient, adapter_dir("a", seed=1))["id"]]
    rstack.start_worker(app=WORKER_APP, extra_env={"AMEND_TEST_SLOW_STEPS": "300"})
    job_id = submit(rclient, ids, "slow-cancel")
    wait_until(lambda: rclient.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 60, "the job to start")
    assert rclient.delete(f"/v1/adapters/{ids[0]}").status_code == 409
    assert rclient.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    done = wait_for_job(rclient, job_id, timeout=10)
    assert done["state"] == "cancelled"
    assert outputs_of(rclient, job_id) == ([], [])
    assert rclient.delete(f"/v1/adapters/{ids[0]}").status_code == 204
