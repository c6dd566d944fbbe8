"""Lineage, stale descendants and their rebuild, in-process (API + job handlers without Celery): a merge built
from a scheduled run's target names it as a parent, is listed as stale when a request on the target completes
and, with rebuild_descendants, is re-run from the new version as the merge's next version, traced to the
request; a job naming the target by id reads its current version."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.app.test_api import upload
from tests.app.test_deletion import _succeed, api, fire  # noqa: F401 - the fixture
from tests.workers.jobs.test_run import run_in_process


def _adapter(api, adapter_dir, name: str, seed: int) -> str:  # noqa: F811
    response = upload(api, adapter_dir(name, seed=seed), name)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _merge(api, ids: list[str]) -> dict:  # noqa: F811
    body = {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "task_arithmetic",
            "output": {"name": "merged", "rank": 4}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_merge_from_the_target_is_stale_and_rebuilt_from_the_new_version(api, adapter_dir):  # noqa: F811
    target, other, new = (_adapter(api, adapter_dir, n, s) for n, s in (("target", 1), ("other", 2), ("new", 3)))
    merge = run_in_process(api, _merge(api, [target, other])["id"])
    assert merge.state == "succeeded", merge.error
    merged = merge.result.adapter_id

    parents = api.get(f"/v1/adapters/{merged}").json()["parents"]
    assert [(p["id"], p["role"], p["version_of"], p["version"]) for p in parents] == [
        (target, "input", target, 1), (other, "input", other, 1)]
    assert [n["id"] for n in api.get(f"/v1/adapters/{target}/lineage").json()["descendants"]] == [merged]
    assert {n["id"] for n in api.get(f"/v1/adapters/{merged}/lineage").json()["ancestors"]} == {target, other}
    assert api.get(f"/v1/adapters/{merged}/lineage", headers=api.other).status_code == 404

    model = api.ids["model"]
    body = {"name": "nightly", "interval_seconds": 3600,
            "job": {"type": "unlearn_pending", "target": {"model": model, "adapter": target}, "method": "grad_diff",
                    "retain": api.ids["other_data"], "params": {"steps": 2}, "rebuild_descendants": True}}
    schedule = api.post("/v1/schedules", json=body)
    assert schedule.status_code == 201, schedule.text
    request = api.post("/v1/unlearning-requests", json={
        "target": {"model": model, "adapter": target}, "dataset": api.ids["data"], "rows": [0]}).json()
    run = fire(api, schedule.json()["id"], datetime(2030, 1, 1, tzinfo=UTC))
    _succeed(api, run.job_id, new, nll_rise=0.0)  # `new` stands in for the unlearning job's output

    done = api.get(f"/v1/unlearning-requests/{request['id']}").json()
    assert done["state"] == "completed" and done["version"] == 2
    assert done["stale_descendants"] == [merged] and list(done["rebuild_jobs"]) == [merged]
    rebuild_id = done["rebuild_jobs"][merged]
    rebuild = api.get(f"/v1/jobs/{rebuild_id}").json()
    assert [a["id"] for a in rebuild["spec"]["adapters"]] == [new, other]  # the new version substituted
    rebuilt = run_in_process(api, rebuild_id)
    assert rebuilt.state == "succeeded", rebuilt.error

    listing = api.get(f"/v1/adapters/{merged}/versions").json()
    assert listing["current"] == 2
    assert listing["versions"][1]["adapter_id"] == rebuilt.result.adapter_id
    assert listing["versions"][1]["requests"] == [request["id"]]
    output_parents = api.get(f"/v1/adapters/{rebuilt.result.adapter_id}").json()["parents"]
    assert [p["id"] for p in output_parents] == [new, other]  # (the uploaded stand-in has no job to name its
    # version by; a real run's output is found as version 2 of the target through its job's requests)

    # a job naming the target (or the merge) by id reads its current version
    spec = _merge(api, [target, merged])["spec"]
    assert [a["id"] for a in spec["adapters"]] == [new, rebuilt.result.adapter_id]
