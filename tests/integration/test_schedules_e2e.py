"""Deletion requests honoured on a schedule by a real beat (celery-redbeat) and a real worker: two pending
requests batched into one unlearning job and both completed with the audit record, a cancelled one left out,
one job for a slot fired twice, a restarted beat that keeps its entries, and promotion only when the guards
hold."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest

from app import devstack
from app.deletion import schedules
from tests.integration.conftest import wait_for_job
from tests.integration.test_unlearn_e2e import PEOPLE, VALUES, register, tiny_lm_dir, upload_rows  # noqa: F401

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def request(client, model: str, dataset: str, rows: list[int]) -> dict:
    response = client.post("/v1/unlearning-requests",
                           json={"target": {"model": model}, "dataset": dataset, "rows": rows, "reason": "erasure"})
    assert response.status_code == 201, response.text
    return response.json()


def state_of(client, request_id: str) -> dict:
    return client.get(f"/v1/unlearning-requests/{request_id}").json()


def test_a_beat_schedule_batches_pending_requests(client, stack, tiny_lm_dir):  # noqa: F811
    model = register(client, tiny_lm_dir, "tiny-lm")["id"]
    rng = random.Random(0)
    facts = upload_rows(client, [{"prompt": f"{who} city ?", "completion": rng.choice(VALUES)} for who in PEOPLE],
                        "facts")
    retain = upload_rows(client, [{"text": f"{who} lives in {rng.choice(VALUES)}"} for who in PEOPLE], "keep")
    one, two = request(client, model, facts["id"], [0, 1]), request(client, model, facts["id"], [1, 2])
    dropped = request(client, model, facts["id"], [3])
    assert client.post(f"/v1/unlearning-requests/{dropped['id']}/cancel").json()["state"] == "cancelled"

    beat = devstack.start_beat(stack.env, log_path=stack.root / "beat.log")
    try:
        job = {"type": "unlearn_pending", "target": {"model": model}, "method": "grad_diff",
               "retain": retain["id"], "params": {"steps": 3, "lr": 0.01, "batch_size": 2, "seed": 0}}
        schedule = client.post("/v1/schedules", json={"name": "often", "interval_seconds": 3, "job": job}).json()
        done = wait_for(lambda: all(state_of(client, r["id"])["state"] in ("completed", "failed") for r in (one, two)),
                        180, "both requests to end")
        assert done
        first, second = state_of(client, one["id"]), state_of(client, two["id"])
        assert first["state"] == second["state"] == "completed", (first, second)
        assert first["job_id"] == second["job_id"] and first["schedule_id"] == schedule["id"]
        finished = wait_for_job(client, first["job_id"])
        assert finished["spec"]["forget"]["rows"] == [0, 1, 2]  # the cancelled request's row 3 is not there
        assert finished["spec"]["requests"] == [one["id"], two["id"]]
        audit = client.get(f"/v1/jobs/{first['job_id']}/audit").json()
        manifest = client.get(f"/v1/datasets/{facts['id']}/manifest").json()["row_sha256"]
        assert audit["signature_valid"] is True
        assert [(r["id"], r["rows"], r["row_sha256"]) for r in audit["requests"]] == [
            (one["id"], [0, 1], manifest[0:2]), (two["id"], [1, 2], manifest[1:3])]
        assert first["audit_record"] == finished["result"]["audit_key"]
        assert state_of(client, dropped["id"])["state"] == "cancelled"

        # nothing pending: runs are recorded as skipped, and no other job appears
        runs = wait_for(lambda: [r for r in client.get(f"/v1/schedules/{schedule['id']}").json()["runs"]
                                 if r["skipped"] == "nothing pending"], 30, "a skipped run")
        # (the integration stack is shared: other tests' jobs are in the list too, so look at this model's)
        this_model = [j["id"] for j in client.get("/v1/jobs", params={"type": "unlearn", "limit": 200}).json()["items"]
                      if j["spec"].get("model") == model]
        assert runs and this_model == [first["job_id"]]

        # beat restarted mid-schedule: the entry stays in Redis and the new beat keeps firing it
        beat.stop()
        assert schedules.registered_slot(client.app.state.celery, schedule["id"]) is not None
        beat = devstack.start_beat(stack.env, log_path=stack.root / "beat2.log")
        later = request(client, model, facts["id"], [4])
        assert wait_for(lambda: state_of(client, later["id"])["state"] == "completed", 120, "the later request")

        # the same slot fired twice (two beats, a redelivery): one job
        client.patch(f"/v1/schedules/{schedule['id']}", json={"paused": True})
        once = client.post("/v1/schedules", json={"name": "manual", "interval_seconds": 86400, "job": job}).json()
        last = request(client, model, facts["id"], [5])
        slot = datetime(2031, 1, 1, tzinfo=UTC).isoformat()
        celery = client.app.state.celery
        jobs_before = len(client.get("/v1/jobs").json()["items"])
        for _ in range(2):
            celery.send_task(schedules.FIRE_TASK, args=["tenant-a", once["id"], slot], queue=schedules.FIRE_QUEUE)
        assert wait_for(lambda: state_of(client, last["id"])["state"] == "completed", 120, "the last request")
        time.sleep(1.0)  # the second message has been taken by now (one worker, in order)
        runs = client.get(f"/v1/schedules/{once['id']}").json()["runs"]
        assert len(runs) == 1 and runs[0]["job_id"] and runs[0]["requests"] == [last["id"]]
        assert len(client.get("/v1/jobs").json()["items"]) == jobs_before + 1
    finally:
        beat.stop()


def test_a_beat_run_is_promoted_only_when_its_guards_hold(client, stack, tiny_lm_dir):  # noqa: F811
    """Two targets, the same run on each (same model, rows, method and seed), two schedules that differ only in
    their promote guard: the one whose guard holds makes its new version current; the other keeps its version
    for review, current unchanged, until it is promoted by hand."""
    rng = random.Random(0)
    facts = upload_rows(client, [{"prompt": f"{who} city ?", "completion": rng.choice(VALUES)} for who in PEOPLE],
                        "facts")
    retain = upload_rows(client, [{"text": f"{who} lives in {rng.choice(VALUES)}"} for who in PEOPLE], "keep")
    held_out = upload_rows(client, [{"prompt": f"{who} city ?", "completion": rng.choice(VALUES)}
                                    for who in PEOPLE[3:]], "held-out")
    job = {"type": "unlearn_pending", "method": "grad_ascent", "retain": retain["id"], "eval": held_out["id"],
           "output": "weights", "params": {"steps": 4, "lr": 0.05, "batch_size": 2, "seed": 0},
           "goal": {"retain_nll_rise": 100.0}}
    guards = {"holds": {"mode": "auto", "max_retain_nll_rise": 50.0},
              "breaks": {"mode": "auto", "max_retain_nll_rise": 0.0}}
    models, asked = {}, {}
    for name in guards:
        models[name] = register(client, tiny_lm_dir, f"tiny-lm-{name}")["id"]
        asked[name] = request(client, models[name], facts["id"], [0, 1])

    beat = devstack.start_beat(stack.env, log_path=stack.root / "beat-promote.log")
    try:
        for name, promote in guards.items():
            body = job | {"target": {"model": models[name]}, "promote": promote}
            response = client.post("/v1/schedules", json={"name": name, "interval_seconds": 2, "job": body})
            assert response.status_code == 201, response.text
        ended = wait_for(lambda: all(state_of(client, r["id"])["state"] in ("completed", "failed")
                                     for r in asked.values()), 240, "both runs to end")
        assert ended
        listings = {}
        for name in guards:
            done = state_of(client, asked[name]["id"])
            assert done["state"] == "completed" and done["version"] == 2, done
            listings[name] = client.get(f"/v1/models/{models[name]}/versions").json()
    finally:
        beat.stop()

    held, broke = listings["holds"], listings["breaks"]
    metrics = held["versions"][1]["metrics"]
    rise = metrics["after"]["retain_nll"] - metrics["before"]["retain_nll"]
    assert metrics["goal_met"] is True, held
    assert 0.0 < rise <= 50.0, metrics  # the run raised the retain NLL: the 0.0 guard must refuse it
    assert held["current"] == 2 and held["versions"][1]["promotion"] == "goal met and guards hold"
    assert held["versions"][1]["promoted_at"] is not None
    current = client.get(f"/v1/models/{models['holds']}").json()  # asked for by id: the new version
    assert (current["id"], current["version"]) == (held["versions"][1]["model_id"], 2)
    assert current["id"] != models["holds"]

    assert broke["current"] == 1 and broke["versions"][1]["promoted_at"] is None
    assert broke["versions"][1]["promotion"].startswith("retain NLL rose"), broke["versions"][1]
    assert broke["versions"][1]["metrics"]["after"]["retain_nll"] == pytest.approx(metrics["after"]["retain_nll"])
    promoted = client.post(f"/v1/models/{models['breaks']}/versions/2/promote")  # a reviewer's decision
    assert promoted.status_code == 200 and promoted.json()["current"] == 2
    assert promoted.json()["versions"][1]["promotion"] == "promoted by request"
