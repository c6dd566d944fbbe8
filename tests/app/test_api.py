"""The HTTP contract with a real redis-server and moto's in-process S3 (unit level: no worker runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import tenant_keys


@pytest.fixture
def api(redis_url, redis_client, moto_s3):
    key_a, key_b, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys,
                        max_upload_bytes=2 * 2**20)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        client.other_key = key_b  # type: ignore[attr-defined]
        client.records = client.app.state.records  # type: ignore[attr-defined]
        yield client


def upload(client: TestClient, directory, name: str = "a", weights_name: str = "adapter_model.safetensors"):
    return client.post(
        "/v1/adapters",
        files={
            "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes(), "application/json"),
            "weights": (weights_name, (directory / "adapter_model.safetensors").read_bytes()),
        },
        data={"name": name},
    )


def stored_keys(client) -> list[str]:
    return list(client.records.storage.list_keys("tenants/"))


def test_app_never_imports_torch():
    code = (
        "import sys, app.main; app.main.create_app(); "
        "assert 'torch' not in sys.modules; assert 'workers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_health_needs_no_key(api):
    assert api.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}


def test_upload_get_list_download_delete(api, adapter_dir):
    directory = adapter_dir(r=4, alpha=8)
    response = upload(api, directory, "first")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["rank"] == 4 and body["alpha"] == 8 and body["n_modules"] == 4 and body["name"] == "first"
    assert body["target_modules"] == ["q_proj", "v_proj"] and len(body["sha256"]) == 64
    assert api.get(f"/v1/adapters/{body['id']}").json() == body | {"version_of": body["id"], "version": 1}
    weights = api.get(f"/v1/adapters/{body['id']}/files/adapter_model.safetensors")
    assert weights.content == (directory / "adapter_model.safetensors").read_bytes()
    config = api.get(f"/v1/adapters/{body['id']}/files/adapter_config.json").json()
    assert config["r"] == 4
    assert api.delete(f"/v1/adapters/{body['id']}").status_code == 204
    assert api.get(f"/v1/adapters/{body['id']}").status_code == 404
    assert stored_keys(api) == []


def test_cursor_pagination(api, adapter_dir):
    directory = adapter_dir()
    ids = [upload(api, directory, f"n{i}").json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.get("/v1/adapters", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))


@pytest.mark.parametrize(
    "mutate, status, code",
    [
        ("pickle_name", 415, "unsupported_media_type"),
        ("truncated", 400, "invalid_adapter"),
        ("rank", 400, "invalid_adapter"),
    ],
)
def test_bad_upload_stores_nothing(api, adapter_dir, tmp_path, mutate, status, code):
    directory = adapter_dir()
    if mutate == "truncated":
        data = (directory / "adapter_model.safetensors").read_bytes()
        (directory / "adapter_model.safetensors").write_bytes(data[:-7])
    if mutate == "rank":
        config = json.loads((directory / "adapter_config.json").read_text()) | {"r": 2}
        (directory / "adapter_config.json").write_text(json.dumps(config))
    name = "adapter_model.bin" if mutate == "pickle_name" else "adapter_model.safetensors"
    response = upload(api, directory, weights_name=name)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert stored_keys(api) == []
    assert api.get("/v1/adapters").json()["items"] == []


def test_oversized_upload_is_413_before_reading(api):
    response = api.post(
        "/v1/adapters",
        content=b"x" * 10,
        headers={"Content-Length": str(10 * 2**30), "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_wrong_or_missing_key(api):
    assert api.get("/v1/adapters", headers={"Authorization": "Bearer nope"}).json()["error"]["code"] == "unauthorized"
    response = api.get("/v1/adapters", headers={"Authorization": ""})
    assert response.status_code == 401


def test_other_tenant_sees_404(api, adapter_dir):
    adapter_id = upload(api, adapter_dir()).json()["id"]
    other = {"Authorization": f"Bearer {api.other_key}"}
    assert api.get(f"/v1/adapters/{adapter_id}", headers=other).status_code == 404
    assert api.delete(f"/v1/adapters/{adapter_id}", headers=other).status_code == 404
    assert api.get("/v1/adapters", headers=other).json()["items"] == []


def merge_body(*ids, method="task_arithmetic", **extra):
    return {"type": "merge", "adapters": [{"id": i, "weight": 1.0} for i in ids], "method": method,
            "params": {}, "output": {"name": "m", "rank": 4}} | extra


def test_job_create_get_etag_list_cancel(api, adapter_dir):
    a = upload(api, adapter_dir("x", seed=1)).json()["id"]
    b = upload(api, adapter_dir("y", seed=2)).json()["id"]
    response = api.post("/v1/jobs", json=merge_body(a, b))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued" and job["type"] == "merge" and job["attempts"] == 0
    first = api.get(f"/v1/jobs/{job['id']}")
    assert first.status_code == 200 and first.headers["ETag"]
    assert api.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": first.headers["ETag"]}).status_code == 304
    assert [j["id"] for j in api.get("/v1/jobs", params={"state": "queued"}).json()["items"]] == [job["id"]]
    assert api.get("/v1/jobs", params={"state": "running"}).json()["items"] == []
    # an adapter used by a queued job cannot be deleted
    assert api.delete(f"/v1/adapters/{a}").json()["error"]["code"] == "adapter_in_use"
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["state"] == "cancelled"
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    assert api.delete(f"/v1/adapters/{a}").status_code == 204


def test_idempotency_key(api, adapter_dir):
    a = upload(api, adapter_dir()).json()["id"]
    headers = {"Idempotency-Key": "k-1"}
    first = api.post("/v1/jobs", json=merge_body(a), headers=headers)
    again = api.post("/v1/jobs", json=merge_body(a), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    different = api.post("/v1/jobs", json=merge_body(a, method="cat"), headers=headers)
    assert different.status_code == 409 and different.json()["error"]["code"] == "idempotency_conflict"


@pytest.mark.parametrize(
    "body_change, code",
    [
        ({"method": "nope"}, "validation_error"),
        ({"params": {"unknown": 1}}, "validation_error"),
        ({"params": {"density": 2}}, "validation_error"),
        ({"output": {"rank": 0}}, "validation_error"),
        ({"output": {"rank": 4, "energy": 0.9}}, "validation_error"),
    ],
)
def test_bad_job_specs(api, adapter_dir, body_change, code):
    a = upload(api, adapter_dir()).json()["id"]
    response = api.post("/v1/jobs", json=merge_body(a, method="ties") | body_change)
    assert response.status_code == 422 and response.json()["error"]["code"] == code


def test_unknown_adapter_in_job(api):
    response = api.post("/v1/jobs", json=merge_body("ad_00000000000000000000"))
    assert response.status_code == 404 and "not found" in response.json()["error"]["message"]
    assert api.get("/v1/jobs").json()["items"] == []


def test_base_model_mismatch_refused_unless_allowed(api, adapter_dir):
    a = upload(api, adapter_dir("x", base_name="model-one")).json()["id"]
    b = upload(api, adapter_dir("y", base_name="model-two")).json()["id"]
    refused = api.post("/v1/jobs", json=merge_body(a, b))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "incompatible_adapters"
    allowed = api.post("/v1/jobs", json=merge_body(a, b, params={"allow_base_mismatch": True}))
    assert allowed.status_code == 202


def test_concurrent_idempotent_posts_create_one_job(api, adapter_dir):
    from concurrent.futures import ThreadPoolExecutor

    a = upload(api, adapter_dir()).json()["id"]
    headers = {"Idempotency-Key": "same-key-concurrently"}
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: api.post("/v1/jobs", json=merge_body(a), headers=headers), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(api.get("/v1/jobs").json()["items"]) == 1
