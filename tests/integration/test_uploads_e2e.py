"""Presigned uploads against the real stack (SeaweedFS, a Celery worker): real part URLs, real parallel PUTs
with httpx; an adapter uploaded in parts downloads byte-identical and merges; a bad file completes with a clear
4xx and leaves nothing registered or stored."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from typer.testing import CliRunner

from app import client as app_client
from app import commands, upload_sessions
from tests.integration.conftest import wait_for_job
from tests.integration.test_client_cli import SharedClient

FILES = ("adapter_config.json", "adapter_model.safetensors")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 5 MiB (S3's and SeaweedFS's minimum), so a 12 MiB adapter goes up in three parallel parts."""
    monkeypatch.setattr(upload_sessions, "part_size", lambda settings, size: 5 * 2**20)


def test_adapter_in_presigned_parts_downloads_identical(client, adapter_dir, small_parts):
    directory = adapter_dir("presigned", seed=3, r=3072, targets=ALL_LINEAR)
    weights = (directory / FILES[1]).read_bytes()
    assert len(weights) > 2 * 5 * 2**20
    adapter = SharedClient(http=client).upload_adapter(directory, name="presigned", presigned=True)
    assert adapter.sha256 == hashlib.sha256(weights).hexdigest() and adapter.rank == 3072
    assert client.get(f"/v1/adapters/{adapter.id}/files/{FILES[1]}").content == weights


def test_the_cli_takes_the_presigned_path_above_the_threshold_and_the_adapter_merges(
    client, adapter_dir, monkeypatch
):
    monkeypatch.setattr(app_client, "PRESIGNED_THRESHOLD", 1)
    monkeypatch.setattr(commands, "make_client", lambda: SharedClient(http=client))
    storage = client.app.state.records.storage
    before = set(storage.list_keys("tenants/tenant-a/uploads/"))  # (the stack's bucket is shared)
    result = CliRunner().invoke(commands.app, ["adapters", "upload", str(adapter_dir("small", seed=4)), "--json"])
    assert result.exit_code == 0, result.output
    adapter = json.loads(result.output)
    made = [key for key in set(storage.list_keys("tenants/tenant-a/uploads/")) - before]
    assert len(made) == 1 and made[0].endswith("/upload.json")  # one upload, completed, its parts removed
    job = client.post("/v1/jobs", json={"type": "merge", "adapters": [{"id": adapter["id"], "weight": 1.0}],
                                        "method": "task_arithmetic", "params": {}, "output": {"rank": 4}})
    assert job.status_code == 202, job.text
    assert wait_for_job(client, job.json()["id"])["state"] == "succeeded"


@pytest.mark.parametrize("fault", ["sha", "safetensors"])
def test_a_bad_presigned_upload_is_refused_and_nothing_stays(client, adapter_dir, fault):
    directory = adapter_dir("bad")
    contents = {name: (directory / name).read_bytes() for name in FILES}
    if fault == "safetensors":
        contents[FILES[1]] = b"not a safetensors file" * 100
    declared = [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in contents.items()]
    if fault == "sha":
        declared[1]["sha256"] = "0" * 64
    before = {a["id"] for a in client.get("/v1/adapters", params={"limit": 200}).json()["items"]}
    upload = client.post("/v1/uploads", json={"kind": "adapter", "files": declared}).json()
    with httpx.Client() as store:
        for item in upload["files"]:
            for part in item["parts"]:
                start = (part["number"] - 1) * item["part_size"]
                data = contents[item["name"]][start: start + item["part_size"]]
                assert store.put(part["url"], content=data).status_code == 200
    response = client.post(f"/v1/uploads/{upload['id']}/complete")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == {"sha": "checksum_mismatch", "safetensors": "invalid_adapter"}[fault]
    assert {a["id"] for a in client.get("/v1/adapters", params={"limit": 200}).json()["items"]} == before
    storage = client.app.state.records.storage
    assert not list(storage.list_keys(f"tenants/tenant-a/uploads/{upload['id']}/"))
    assert client.get(f"/v1/uploads/{upload['id']}").status_code == 404
