"""Deletion requests and schedules through the API, with schedule firing called in-process (the integration
test fires them from a real beat): idempotency, row checks, cancel, batching, one job per slot, skipped runs,
at_risk, the redbeat entry, reindex, and cron next-run times across daylight-saving changes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from app.deletion import schedules
from app.jobs import lifecycle
from app.main import create_app
from app.reindex import reindex_and_requeue
from app.schemas.deletion import Timing
from app.schemas.jobs import JobResult
from app.settings import Settings
from tests.conftest import tenant_keys
from tests.factories import tiny_model_tar


@pytest.fixture
def api(redis_url, redis_client, moto_s3):
    key_a, key_b, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        client.other = {"Authorization": f"Bearer {key_b}"}  # type: ignore[attr-defined]
        client.records = client.app.state.records  # type: ignore[attr-defined]
        model = client.post("/v1/models", files={"archive": ("m.tar.gz", tiny_model_tar())}).json()["id"]
        rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(6))
        datasets = [client.post("/v1/datasets", files={"file": ("rows.jsonl", rows)}).json()["id"] for _ in range(2)]
        client.ids = {"model": model, "data": datasets[0], "other_data": datasets[1]}  # type: ignore[attr-defined]
        yield client


def ask(api, rows, dataset=None, **extra):
    body = {"target": {"model": api.ids["model"]}, "dataset": dataset or api.ids["data"], "rows": rows,
            "reason": "gdpr art. 17", "requested_by": "dpo@example.com", **extra}
    return api.post("/v1/unlearning-requests", json=body)


def pending_schedule(api, **timing) -> dict:
    body = {"name": "nightly", **(timing or {"interval_seconds": 3600}),
            "job": {"type": "unlearn_pending", "target": {"model": api.ids["model"]}, "method": "grad_diff",
                    "retain": api.ids["other_data"], "params": {"steps": 2}}}
    response = api.post("/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def fire(api, schedule_id: str, slot: datetime):
    state = api.app.state
    return schedules.fire(state.records, state.settings, state.celery, "tenant-a", schedule_id, slot)


def test_requests_are_checked_idempotent_and_cancellable(api):
    first = ask(api, [3, 1, 1])
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["state"] == "pending" and body["rows"] == [1, 3] and body["job_id"] is None
    again = ask(api, [1, 3])  # the same rows for the same target: the same request
    assert again.status_code == 200 and again.json()["id"] == body["id"]

    bad = ask(api, [2, 9, 7])
    assert bad.status_code == 422 and "row 7" in bad.json()["error"]["message"]  # the first bad id (sorted)
    assert ask(api, [0], dataset="ds_00000000000000000000").status_code == 404

    keyed = api.post("/v1/unlearning-requests", headers={"Idempotency-Key": "k1"},
                     json={"target": {"model": api.ids["model"]}, "dataset": api.ids["data"], "rows": [5]})
    assert keyed.status_code == 201
    clash = api.post("/v1/unlearning-requests", headers={"Idempotency-Key": "k1"},
                     json={"target": {"model": api.ids["model"]}, "dataset": api.ids["data"], "rows": [4]})
    assert clash.status_code == 409

    listed = api.get("/v1/unlearning-requests", params={"state": "pending", "target": api.ids["model"]}).json()
    assert {item["id"] for item in listed["items"]} == {body["id"], keyed.json()["id"]}
    cancelled = api.post(f"/v1/unlearning-requests/{body['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert api.post(f"/v1/unlearning-requests/{body['id']}/cancel").status_code == 409
    assert ask(api, [1, 3]).status_code == 201  # a cancelled request no longer stands for its rows
    assert api.get(f"/v1/unlearning-requests/{keyed.json()['id']}", headers=api.other).status_code == 404
    theirs = {"target": {"model": api.ids["model"]}, "dataset": api.ids["data"], "rows": [0]}
    assert api.post("/v1/unlearning-requests", json=theirs, headers=api.other).status_code == 404  # A's model


def test_a_run_batches_pending_requests_into_one_job_once_per_slot(api):
    schedule = pending_schedule(api)
    one, two = ask(api, [0, 1]).json(), ask(api, [1, 4]).json()
    dropped = ask(api, [5]).json()
    elsewhere = ask(api, [2], dataset=api.ids["other_data"]).json()
    api.post(f"/v1/unlearning-requests/{dropped['id']}/cancel")

    slot = datetime(2030, 1, 1, 3, 0, tzinfo=UTC)
    run = fire(api, schedule["id"], slot)
    assert run is not None and run.job_id and run.requests == [one["id"], two["id"]]
    assert fire(api, schedule["id"], slot) is None  # the same slot again: nothing more
    jobs = api.get("/v1/jobs").json()["items"]
    assert [job["id"] for job in jobs] == [run.job_id]
    spec = jobs[0]["spec"]
    assert spec["forget"] == {"dataset": api.ids["data"], "rows": [0, 1, 4]}
    assert spec["requests"] == [one["id"], two["id"]] and spec["retain"] == api.ids["other_data"]
    for request in (one, two):
        got = api.get(f"/v1/unlearning-requests/{request['id']}").json()
        assert got["state"] == "scheduled" and got["job_id"] == run.job_id and got["schedule_id"] == schedule["id"]
    # a request on another dataset waits for a later run (one job forgets rows of one dataset)
    assert api.get(f"/v1/unlearning-requests/{elsewhere['id']}").json()["state"] == "pending"
    assert api.post(f"/v1/unlearning-requests/{one['id']}/cancel").status_code == 409

    records = api.records
    lifecycle.start(records, run.job_id, 3)
    lifecycle.finish(records, run.job_id, "succeeded", JobResult(audit_key="tenants/tenant-a/jobs/x/audit.json"))
    for request in (one, two):
        got = api.get(f"/v1/unlearning-requests/{request['id']}").json()
        assert got["state"] == "completed" and got["audit_record"].endswith("audit.json")
    assert api.get(f"/v1/unlearning-requests/{dropped['id']}").json()["state"] == "cancelled"

    later = fire(api, schedule["id"], slot + timedelta(hours=1))  # the other dataset's request
    assert later is not None and later.requests == [elsewhere["id"]]
    lifecycle.finish(records, later.job_id, "failed")
    failed = api.get(f"/v1/unlearning-requests/{elsewhere['id']}").json()
    assert failed["state"] == "failed" and failed["error"]["code"] == "job_failed"
    empty = fire(api, schedule["id"], slot + timedelta(hours=2))
    assert empty is not None and empty.skipped == "nothing pending" and empty.job_id is None
    runs = api.get(f"/v1/schedules/{schedule['id']}").json()["runs"]
    assert [r["skipped"] for r in runs] == ["nothing pending", None, None]


def test_schedule_entry_timing_pause_at_risk_and_reindex(api, redis_client):
    celery = api.app.state.celery
    schedule = pending_schedule(api, interval_seconds=600)
    next_run = datetime.fromisoformat(schedule["next_run_at"])
    assert timedelta(seconds=590) < next_run - datetime.now(UTC) <= timedelta(seconds=600)
    assert schedules.registered_slot(celery, schedule["id"]) == next_run

    soon = ask(api, [0], deadline=(datetime.now(UTC) + timedelta(minutes=5)).isoformat()).json()
    late = ask(api, [1], deadline=(datetime.now(UTC) + timedelta(hours=5)).isoformat()).json()
    assert soon["at_risk"] is True and late["at_risk"] is False

    paused = api.patch(f"/v1/schedules/{schedule['id']}", json={"paused": True}).json()
    assert paused["paused"] and paused["next_run_at"] is None
    assert schedules.registered_slot(celery, schedule["id"]) is None
    assert api.get(f"/v1/unlearning-requests/{late['id']}").json()["at_risk"] is True  # no run to come
    resumed = api.patch(f"/v1/schedules/{schedule['id']}", json={"paused": False, "cron": "0 3 * * *",
                                                                  "timezone": "Europe/Berlin"}).json()
    assert resumed["cron"] == "0 3 * * *" and resumed["interval_seconds"] is None
    assert datetime.fromisoformat(resumed["next_run_at"]).astimezone(
        schedules.ZoneInfo("Europe/Berlin")).hour == 3
    assert api.patch(f"/v1/schedules/{schedule['id']}", json={"cron": "nope"}).status_code == 422
    assert api.post("/v1/schedules", json={"name": "x", "cron": "0 3 * * *", "interval_seconds": 5,
                                           "job": {"type": "unlearn_pending", "target": {"model": api.ids["model"]},
                                                   "method": "grad_ascent"}}).status_code == 422

    redis_client.flushdb()  # Redis lost: reindex rebuilds requests, schedules and the beat entries
    counts = reindex_and_requeue(api.records, celery)
    assert counts["unlearning_requests"] == 2 and counts["schedules"] == 1
    assert api.get(f"/v1/unlearning-requests/{soon['id']}").json()["state"] == "pending"
    assert schedules.registered_slot(celery, schedule["id"]) == datetime.fromisoformat(resumed["next_run_at"])
    assert ask(api, [0]).status_code == 200  # the content key is back
    assert api.delete(f"/v1/schedules/{schedule['id']}", headers=api.other).status_code == 404
    assert api.delete(f"/v1/schedules/{schedule['id']}").status_code == 204
    assert schedules.registered_slot(celery, schedule["id"]) is None


def test_jobs_are_listed_by_the_schedule_that_made_them(api):
    schedule, other = pending_schedule(api), pending_schedule(api)
    ask(api, [0, 1])
    run = fire(api, schedule["id"], datetime(2030, 1, 1, 3, 0, tzinfo=UTC))
    assert run is not None and run.job_id
    by_hand = api.post("/v1/jobs", json={"type": "unlearn", "model": api.ids["model"], "method": "grad_diff",
                                         "forget": {"dataset": api.ids["data"]}, "retain": api.ids["other_data"],
                                         "params": {"steps": 1}})
    assert by_hand.status_code == 202, by_hand.text
    listed = api.get("/v1/jobs", params={"schedule": schedule["id"]}).json()["items"]
    assert [job["id"] for job in listed] == [run.job_id]
    assert api.get("/v1/jobs", params={"schedule": other["id"]}).json()["items"] == []
    assert len(api.get("/v1/jobs").json()["items"]) == 2


def test_the_beat_entry_is_due_at_its_slot_not_later(api, redis_client):
    """redbeat puts an entry in its due-set at last_run_at + (next occurrence − now): the entry must be due at
    the slot itself (a slot 10 minutes ahead was due 20 minutes ahead), and at once when the slot is past."""
    from redbeat.schedulers import RedBeatConfig, RedBeatSchedulerEntry

    celery = api.app.state.celery
    schedule = pending_schedule(api, interval_seconds=600)
    slot = datetime.fromisoformat(schedule["next_run_at"])
    key = RedBeatSchedulerEntry.generate_key(celery, schedules.entry_name(schedule["id"]))
    due_set = RedBeatConfig(celery).schedule_key
    assert abs(redis_client.zscore(due_set, key) - slot.timestamp()) < 2

    record = schedules.get(api.records, "tenant-a", schedule["id"])
    record.next_run_at = datetime.now(UTC) - timedelta(minutes=5)  # a beat that was down: fire it now
    schedules.register(celery, record)
    assert redis_client.zscore(due_set, key) <= datetime.now(UTC).timestamp()
    entry = RedBeatSchedulerEntry.from_key(key, app=celery)
    assert entry.is_due().is_due


def test_any_job_spec_is_submitted_as_is(api):
    body = {"name": "retrain", "run_at": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
            "job": {"type": "unlearn", "model": api.ids["model"], "forget": {"dataset": api.ids["data"]},
                    "retain": api.ids["other_data"], "method": "grad_diff", "params": {"steps": 1}}}
    schedule = api.post("/v1/schedules", json=body).json()
    slot = datetime.fromisoformat(schedule["next_run_at"])
    run = fire(api, schedule["id"], slot)
    assert run is not None and run.job_id
    assert api.get(f"/v1/jobs/{run.job_id}").json()["spec"]["forget"]["dataset"] == api.ids["data"]
    after = api.get(f"/v1/schedules/{schedule['id']}").json()
    assert after["next_run_at"] is None  # a one-off runs once
    assert schedules.registered_slot(api.app.state.celery, schedule["id"]) is None


BERLIN = "Europe/Berlin"


@pytest.mark.parametrize(("cron", "after", "expected_utc"), [
    # spring forward (2025-03-30, 02:00 -> 03:00 local): 03:00 local is 01:00 UTC after the change
    ("0 3 * * *", "2025-03-29T12:00:00+00:00", ["2025-03-30T01:00:00", "2025-03-31T01:00:00"]),
    ("0 3 * * *", "2025-03-28T12:00:00+00:00", ["2025-03-29T02:00:00", "2025-03-30T01:00:00"]),
    # 02:30 does not exist that day: the run is at the first minute after the gap, 03:00 CEST
    ("30 2 * * *", "2025-03-29T12:00:00+00:00", ["2025-03-30T01:00:00", "2025-03-31T00:30:00"]),
    # fall back (2025-10-26, 03:00 -> 02:00 local): 02:30 exists twice; it runs once, at the first
    ("30 2 * * *", "2025-10-25T12:00:00+00:00", ["2025-10-26T00:30:00", "2025-10-27T01:30:00"]),
    ("0 3 * * *", "2025-10-25T12:00:00+00:00", ["2025-10-26T02:00:00", "2025-10-27T02:00:00"]),
    # an hourly expression runs in both 02:00 hours: they are distinct hours
    ("0 * * * *", "2025-10-26T00:30:00+00:00", ["2025-10-26T01:00:00", "2025-10-26T02:00:00"]),
])
def test_cron_next_runs_across_daylight_saving_changes(cron, after, expected_utc):
    timing = Timing(cron=cron, timezone=BERLIN)
    moment = datetime.fromisoformat(after)
    got = []
    for _ in expected_utc:
        moment = schedules.next_run(timing, moment)
        assert moment is not None
        got.append(moment.astimezone(UTC).replace(tzinfo=None).isoformat())
    assert got == expected_utc


def test_interval_slots_are_anchored():
    anchor = datetime(2030, 1, 1, tzinfo=UTC)
    timing = Timing(interval_seconds=60)
    assert schedules.next_run(timing, anchor + timedelta(seconds=150), anchor) == anchor + timedelta(seconds=180)
    assert schedules.next_run(timing, anchor + timedelta(seconds=180), anchor) == anchor + timedelta(seconds=240)


def _succeed(api, job_id: str, adapter_id: str, nll_rise: float, goal_met: bool = True) -> None:
    records = api.records
    report = {"goal_met": goal_met, "before": {"retain_nll": 1.0}, "after": {"retain_nll": 1.0 + nll_rise}}
    lifecycle.start(records, job_id, 3)
    lifecycle.finish(records, job_id, "succeeded", JobResult(adapter_id=adapter_id, report=report,
                                                             audit_key=f"tenants/tenant-a/jobs/{job_id}/audit.json"))


def test_runs_make_versions_promoted_only_when_the_guards_hold(api, adapter_dir):
    outputs = []
    for name in ("out1", "out2", "out3"):  # stand-ins for the jobs' output adapters (the next run reads one)
        directory = adapter_dir(name)
        files = {"config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
                 "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes())}
        outputs.append(api.post("/v1/adapters", files=files).json()["id"])
    body = {"name": "v", "interval_seconds": 3600,
            "job": {"type": "unlearn_pending", "target": {"model": api.ids["model"]}, "method": "grad_diff",
                    "retain": api.ids["other_data"], "params": {"steps": 2},
                    "promote": {"mode": "auto", "max_retain_nll_rise": 0.1}}}
    schedule = api.post("/v1/schedules", json=body).json()
    model = api.ids["model"]
    assert api.get(f"/v1/models/{model}/versions").json()["current"] == 1
    slot = datetime(2030, 1, 1, tzinfo=UTC)

    first = ask(api, [0]).json()
    run = fire(api, schedule["id"], slot)
    _succeed(api, run.job_id, outputs[0], nll_rise=0.05)  # guards hold: promoted
    listing = api.get(f"/v1/models/{model}/versions").json()
    assert listing["current"] == 2 and listing["versions"][1]["job_id"] == run.job_id
    assert listing["versions"][1]["adapter_id"] == outputs[0]
    assert listing["versions"][1]["requests"] == [first["id"]] and listing["versions"][1]["parent_version"] == 1
    assert api.get(f"/v1/unlearning-requests/{first['id']}").json()["version"] == 2

    ask(api, [1])
    run = fire(api, schedule["id"], slot + timedelta(hours=1))
    spec = api.get(f"/v1/jobs/{run.job_id}").json()["spec"]
    assert spec["adapter"] == outputs[0] and spec["output"] == "adapter"  # from the current
    _succeed(api, run.job_id, outputs[1], nll_rise=0.5)  # the NLL guard breaks: kept back
    listing = api.get(f"/v1/models/{model}/versions").json()
    assert listing["current"] == 2 and "retain NLL rose" in listing["versions"][2]["promotion"]

    ask(api, [2])
    run = fire(api, schedule["id"], slot + timedelta(hours=2))
    _succeed(api, run.job_id, outputs[2], nll_rise=0.0, goal_met=False)
    assert api.get(f"/v1/models/{model}/versions").json()["current"] == 2  # goal not met: kept back

    promoted = api.post(f"/v1/models/{model}/versions/3/promote")
    assert promoted.status_code == 200 and promoted.json()["current"] == 3
    assert api.post(f"/v1/models/{model}/versions/9/promote").status_code == 404
    assert api.post(f"/v1/models/{model}/versions/3/promote", headers=api.other).status_code == 404
