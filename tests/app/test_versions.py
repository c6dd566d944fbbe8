"""Versions asked for by id, in-process (API + job handlers without Celery): after a promotion a target's id
reads its current version (GET, download, lineage, job inputs) and `?version=N` / a job input's version pin
reads another; a version promoted by hand starts the rebuild of stale descendants as an automatic promotion
does; a model target unlearned into an adapter over it refuses to rebuild what reads a model, and one unlearned
into weights rebuilds it from the new model."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import torch

from app.jobs import lifecycle
from app.schemas.jobs import JobResult
from tests.app.jobs.test_compress import save_llama, upload_model_dir
from tests.app.test_api import upload
from tests.app.test_deletion import _succeed, api, fire  # noqa: F401 - the fixture
from tests.factories import tiny_llama
from tests.workers.jobs.test_run import run_in_process

SLOT = datetime(2030, 1, 1, tzinfo=UTC)


def _adapter(api, adapter_dir, name: str, seed: int) -> tuple[str, bytes]:  # noqa: F811
    directory = adapter_dir(name, seed=seed)
    response = upload(api, directory, name)
    assert response.status_code == 201, response.text
    return response.json()["id"], (directory / "adapter_model.safetensors").read_bytes()


def _schedule(api, target: dict, **job) -> str:  # noqa: F811
    body = {"name": "nightly", "interval_seconds": 3600,
            "job": {"type": "unlearn_pending", "target": target, "method": "grad_diff",
                    "retain": api.ids["other_data"], "params": {"steps": 2}, **job}}
    response = api.post("/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _request(api, target: dict, rows: list[int]) -> dict:  # noqa: F811
    response = api.post("/v1/unlearning-requests", json={"target": target, "dataset": api.ids["data"], "rows": rows})
    assert response.status_code == 201, response.text
    return response.json()


def _submit(api, body: dict):  # noqa: F811
    return api.post("/v1/jobs", json=body)


def _merge(target: str | dict, other: str) -> dict:
    first = target if isinstance(target, dict) else {"id": target}
    return {"type": "merge", "adapters": [first, {"id": other}], "method": "task_arithmetic",
            "output": {"name": "merged", "rank": 4}}


def test_a_target_read_by_id_is_its_current_version_and_a_version_can_be_pinned(api, adapter_dir):  # noqa: F811
    (target, v1_bytes), (other, _), (new, v2_bytes) = (
        _adapter(api, adapter_dir, n, s) for n, s in (("target", 1), ("other", 2), ("new", 3)))
    where = {"model": api.ids["model"], "adapter": target}
    schedule = _schedule(api, where, promote={"mode": "auto", "max_retain_nll_rise": 0.1})
    _request(api, where, [0])
    run = fire(api, schedule, SLOT)
    _succeed(api, run.job_id, new, nll_rise=0.0)  # `new` stands in for the run's output: promoted, version 2
    assert api.get(f"/v1/adapters/{target}/versions").json()["current"] == 2

    got = api.get(f"/v1/adapters/{target}").json()
    assert (got["id"], got["version_of"], got["version"]) == (new, target, 2)
    assert got["sha256"] == hashlib.sha256(v2_bytes).hexdigest()
    pinned = api.get(f"/v1/adapters/{target}", params={"version": 1}).json()
    assert (pinned["id"], pinned["version"]) == (target, 1) and pinned["sha256"] == hashlib.sha256(v1_bytes).hexdigest()
    weights = f"/v1/adapters/{target}/files/adapter_model.safetensors"
    assert api.get(weights).content == v2_bytes
    assert api.get(weights, params={"version": 1}).content == v1_bytes
    assert api.get(f"/v1/adapters/{target}", params={"version": 3}).status_code == 404
    assert api.get(f"/v1/adapters/{other}", params={"version": 2}).status_code == 404  # never unlearned: v1 only
    plain = api.get(f"/v1/adapters/{other}").json()
    assert (plain["id"], plain["version_of"], plain["version"]) == (other, other, 1)
    assert api.get(f"/v1/adapters/{target}", headers=api.other).status_code == 404
    assert api.get(weights, params={"version": 1}, headers=api.other).status_code == 404
    assert api.get(f"/v1/adapters/{target}/lineage").json()["id"] == new
    assert api.get(f"/v1/adapters/{target}/lineage", params={"version": 1}).json()["id"] == target

    # job inputs: the bare id reads version 2; a pin reads version 1
    bare = _submit(api, _merge(target, other))
    assert bare.status_code == 202, bare.text
    assert [a["id"] for a in bare.json()["spec"]["adapters"]] == [new, other]
    merged = run_in_process(api, bare.json()["id"])
    assert merged.state == "succeeded", merged.error
    parents = api.get(f"/v1/adapters/{merged.result.adapter_id}").json()["parents"]
    assert [p["id"] for p in parents] == [new, other]
    old = _submit(api, _merge({"id": target, "version": 1}, other)).json()["spec"]["adapters"]
    assert [(a["id"], a["version"]) for a in old] == [(target, 1), (other, None)]
    assert _submit(api, _merge({"id": other, "version": 2}, target)).status_code == 404
    compress = {"type": "compress", "method": "cast", "adapter": target, "params": {"dtype": "bf16"}}
    assert _submit(api, compress).json()["spec"]["adapter"] == new
    pinned_spec = _submit(api, {**compress, "adapter_version": 1}).json()["spec"]
    assert (pinned_spec["adapter"], pinned_spec["adapter_version"]) == (target, 1)
    assert _submit(api, {**compress, "adapter_version": 2}).json()["spec"]["adapter"] == new


def test_a_model_target_reads_its_current_model_and_refuses_an_adapter_version(api, adapter_dir):  # noqa: F811
    model = api.ids["model"]
    replacement = api.post("/v1/models", files={"archive": ("m.tar.gz", _tar())}).json()["id"]
    schedule = _schedule(api, {"model": model}, output="weights")
    _request(api, {"model": model}, [0])
    run = fire(api, schedule, SLOT)
    lifecycle.start(api.records, run.job_id, 3)
    lifecycle.finish(api.records, run.job_id, "succeeded", JobResult(model_id=replacement, report={"goal_met": True}))
    got = api.get(f"/v1/models/{model}").json()
    assert (got["id"], got["version_of"], got["version"]) == (replacement, model, 2)
    assert api.get(f"/v1/models/{model}", params={"version": 1}).json()["id"] == model
    assert api.get(f"/v1/models/{model}/files/config.json").status_code == 200
    assert api.get(f"/v1/models/{model}", headers=api.other).status_code == 404

    # a second model target unlearned into an adapter over it: still the model when asked for; pinned: 422
    other_model = api.post("/v1/models", files={"archive": ("m.tar.gz", _tar())}).json()["id"]
    adapter, _ = _adapter(api, adapter_dir, "lora", 4)
    schedule = _schedule(api, {"model": other_model}, output="adapter")
    _request(api, {"model": other_model}, [1])
    run = fire(api, schedule, SLOT + timedelta(hours=1))
    _succeed(api, run.job_id, adapter, nll_rise=0.0)
    assert api.get(f"/v1/models/{other_model}/versions").json()["current"] == 2
    got = api.get(f"/v1/models/{other_model}").json()
    assert (got["id"], got["version"]) == (other_model, 1)  # the model the current adapter sits on
    refused = api.get(f"/v1/models/{other_model}", params={"version": 2})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "version_is_adapter"
    assert adapter in refused.json()["error"]["message"]


def _tar() -> bytes:
    from tests.factories import tiny_model_tar

    return tiny_model_tar()


def test_a_version_promoted_by_hand_rebuilds_stale_descendants(api, adapter_dir):  # noqa: F811
    (target, _), (other, _), (new, _) = (
        _adapter(api, adapter_dir, n, s) for n, s in (("target", 1), ("other", 2), ("new", 3)))
    merge = run_in_process(api, _submit(api, _merge(target, other)).json()["id"])
    assert merge.state == "succeeded", merge.error
    merged = merge.result.adapter_id
    where = {"model": api.ids["model"], "adapter": target}
    schedule = _schedule(api, where, promote={"mode": "never"}, rebuild_descendants=True)
    request = _request(api, where, [0])
    run = fire(api, schedule, SLOT)
    _succeed(api, run.job_id, new, nll_rise=0.0)
    kept = api.get(f"/v1/unlearning-requests/{request['id']}").json()
    assert kept["stale_descendants"] == [merged] and kept["rebuild_jobs"] == {}  # kept for review: no rebuild
    assert api.get(f"/v1/adapters/{target}/versions").json()["current"] == 1

    assert api.post(f"/v1/adapters/{target}/versions/2/promote", headers=api.other).status_code == 404
    promoted = api.post(f"/v1/adapters/{target}/versions/2/promote")
    assert promoted.status_code == 200 and promoted.json()["current"] == 2
    jobs = api.get(f"/v1/unlearning-requests/{request['id']}").json()["rebuild_jobs"]
    assert list(jobs) == [merged]
    spec = api.get(f"/v1/jobs/{jobs[merged]}").json()["spec"]
    assert [a["id"] for a in spec["adapters"]] == [new, other]
    again = api.post(f"/v1/adapters/{target}/versions/2/promote")  # promoted twice: one rebuild
    assert again.status_code == 200
    assert api.get(f"/v1/unlearning-requests/{request['id']}").json()["rebuild_jobs"] == jobs
    assert len([j for j in api.get("/v1/jobs", params={"type": "merge"}).json()["items"]]) == 2
    rebuilt = run_in_process(api, jobs[merged])
    assert rebuilt.state == "succeeded", rebuilt.error
    listing = api.get(f"/v1/adapters/{merged}/versions").json()
    assert listing["current"] == 2 and listing["versions"][1]["adapter_id"] == rebuilt.result.adapter_id
    assert listing["versions"][1]["requests"] == [request["id"]]
    assert api.get(f"/v1/adapters/{merged}").json()["id"] == rebuilt.result.adapter_id

    # back to version 1 by hand: it has no run, so nothing is rebuilt
    assert api.post(f"/v1/adapters/{target}/versions/1/promote").json()["current"] == 1
    assert len(api.get("/v1/jobs", params={"type": "merge"}).json()["items"]) == 2


def _extract(api, base: str, tuned: str) -> str:  # noqa: F811
    body = {"type": "compress", "method": "extract", "base_model": base, "model": tuned,
            "output": {"name": "extracted", "rank": 4}}
    response = _submit(api, body)
    assert response.status_code == 202, response.text
    job = run_in_process(api, response.json()["id"])
    assert job.state == "succeeded", job.error
    return job.result.adapter_id


def _tuned(tmp_path, name: str, seed: int) -> object:
    model = tiny_llama(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if module_name.endswith(("k_proj", "up_proj")):
                m, n = module.weight.shape
                module.weight += (torch.randn(m, 2, generator=g) * 0.05) @ (torch.randn(2, n, generator=g) * 0.05)
    model.save_pretrained(tmp_path / name)
    (tmp_path / name / "tokenizer.json").write_bytes(b'{"version": "1.0"}')  # admitted for text rows (never run)
    return tmp_path / name


def test_a_model_target_rebuilds_from_new_weights_and_refuses_from_an_adapter(api, adapter_dir, tmp_path):  # noqa: F811
    base = upload_model_dir(api, save_llama(tmp_path / "base"))
    tuned, unlearned = (upload_model_dir(api, _tuned(tmp_path, n, s)) for n, s in (("tuned", 5), ("unlearned", 6)))
    extracted = _extract(api, base, tuned)

    # unlearned into weights: the extract is re-run with the new model in place of the old
    schedule = _schedule(api, {"model": tuned}, output="weights", rebuild_descendants=True)
    request = _request(api, {"model": tuned}, [0])
    run = fire(api, schedule, SLOT)
    lifecycle.start(api.records, run.job_id, 3)
    lifecycle.finish(api.records, run.job_id, "succeeded", JobResult(model_id=unlearned, report={"goal_met": True}))
    done = api.get(f"/v1/unlearning-requests/{request['id']}").json()
    assert done["stale_descendants"] == [extracted] and list(done["rebuild_jobs"]) == [extracted]
    spec = api.get(f"/v1/jobs/{done['rebuild_jobs'][extracted]}").json()["spec"]
    assert (spec["base_model"], spec["model"]) == (base, unlearned)
    rebuilt = run_in_process(api, done["rebuild_jobs"][extracted])
    assert rebuilt.state == "succeeded", rebuilt.error
    assert api.get(f"/v1/adapters/{extracted}").json()["id"] == rebuilt.result.adapter_id

    # unlearned into an adapter over it: the extract reads a model, and an adapter cannot stand in: refused
    other = upload_model_dir(api, _tuned(tmp_path, "tuned2", 7))
    from_other = _extract(api, base, other)
    adapter, _ = _adapter(api, adapter_dir, "lora", 4)
    schedule = _schedule(api, {"model": other}, output="adapter", rebuild_descendants=True)
    request = _request(api, {"model": other}, [1])
    run = fire(api, schedule, SLOT + timedelta(hours=1))
    _succeed(api, run.job_id, adapter, nll_rise=0.0)
    done = api.get(f"/v1/unlearning-requests/{request['id']}").json()
    assert done["stale_descendants"] == [from_other] and done["rebuild_jobs"] == {}
    assert "unlearned into an adapter" in done["rebuild_refused"][from_other]
    assert api.get(f"/v1/adapters/{from_other}/versions").json()["current"] == 1


def test_an_id_never_unlearned_lists_version_1_as_registered(api, adapter_dir):  # noqa: F811
    """Before any run an id's versions are version 1 alone, made and current since the record was: the same
    answer on every read (not the time of the read), as once a run has added a version."""
    adapter_id, _ = _adapter(api, adapter_dir, "plain", seed=3)
    created = api.get(f"/v1/adapters/{adapter_id}").json()["created_at"]
    model = api.ids["model"]
    model_created = api.get(f"/v1/models/{model}").json()["created_at"]
    reads = ((f"/v1/adapters/{adapter_id}/versions", created), (f"/v1/models/{model}/versions", model_created))
    for path, when in reads:
        first = api.get(path).json()
        (version,) = first["versions"]
        assert version["version"] == 1 and first["current"] == 1
        assert version["created_at"] == when and version["promoted_at"] == when, version
        assert api.get(path).json() == first
