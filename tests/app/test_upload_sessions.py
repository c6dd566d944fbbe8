"""Presigned uploads on moto: create → parts → complete registers through the direct upload's checks; a bad
file is refused with nothing registered or left staged; bounds, expiry and delete.

moto does not serve HTTP, so a part URL is taken apart and its part written with boto3 to exactly the key,
multipart upload and part number it signs (tests/integration/test_uploads_e2e.py PUTs to real URLs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from fastapi.testclient import TestClient

from app import upload_sessions
from app.main import create_app
from app.settings import Settings
from tests.conftest import tenant_keys
from tests.factories import tiny_model_tar

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def api(redis_url, redis_client, moto_s3):
    key_a, key_b, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys,
                        max_upload_bytes=4 * 2**20)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        client.other_key = key_b  # type: ignore[attr-defined]
        yield client


def declare(name: str, data: bytes) -> dict:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def put_parts(client: TestClient, upload: dict, contents: dict[str, bytes]) -> set[str]:
    """PUT every part as a client would; returns the keys the part URLs write to."""
    storage = client.app.state.records.storage
    written = set()
    for item in upload["files"]:
        data, size = contents[item["name"]], item["part_size"]
        for part in item["parts"]:
            url = urlsplit(part["url"])
            query = parse_qs(url.query)
            bucket, key = unquote(url.path).lstrip("/").split("/", 1)
            # an adapter's weights are staged where they will be published; every other file under the upload
            staging = "adapters/" if (upload["kind"], item["name"]) == ("adapter", FILES[1]) else "uploads/"
            assert bucket == storage.bucket and key.startswith("tenants/tenant-a/" + staging)
            written.add(key)
            number = int(query["partNumber"][0])
            assert number == part["number"]
            storage.client.upload_part(Bucket=bucket, Key=key, UploadId=query["uploadId"][0], PartNumber=number,
                                       Body=data[(number - 1) * size: number * size])
    return written


def start(client: TestClient, kind: str, contents: dict[str, bytes], **extra) -> dict:
    body = {"kind": kind, "files": [declare(name, data) for name, data in contents.items()], **extra}
    response = client.post("/v1/uploads", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def staged(client: TestClient) -> list[str]:
    return list(client.app.state.records.storage.list_keys("tenants/tenant-a/uploads/"))


def adapter_files(adapter_dir) -> dict[str, bytes]:
    directory: Path = adapter_dir("presigned")
    return {name: (directory / name).read_bytes() for name in FILES}


def test_adapter_through_presigned_parts_is_registered_and_downloads_identical(api, adapter_dir):
    contents = adapter_files(adapter_dir)
    upload = start(api, "adapter", contents, name="big")
    assert upload["state"] == "open" and all(item["parts"] for item in upload["files"])
    written = put_parts(api, upload, contents)
    done = api.post(f"/v1/uploads/{upload['id']}/complete")
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "completed"
    adapter = api.get(f"/v1/adapters/{done.json()['result_id']}").json()
    # published where its parts were written: the reserved id, no second copy of the weights
    assert f"tenants/tenant-a/adapters/{adapter['id']}/{FILES[1]}" in written
    assert sorted(api.app.state.records.storage.list_keys(f"tenants/tenant-a/adapters/{adapter['id']}/")) == [
        f"tenants/tenant-a/adapters/{adapter['id']}/{name}" for name in (*FILES, "record.json")]
    assert adapter["name"] == "big" and adapter["sha256"] == hashlib.sha256(contents[FILES[1]]).hexdigest()
    weights = api.get(f"/v1/adapters/{adapter['id']}/files/{FILES[1]}")
    assert weights.content == contents[FILES[1]]
    assert staged(api) == [f"tenants/tenant-a/uploads/{upload['id']}/upload.json"]  # parts gone, record kept
    again = api.post(f"/v1/uploads/{upload['id']}/complete")  # a retried complete answers the same
    assert again.status_code == 200 and again.json()["result_id"] == adapter["id"]
    other = api.get(f"/v1/uploads/{upload['id']}", headers={"Authorization": f"Bearer {api.other_key}"})
    assert other.status_code == 404


@pytest.mark.parametrize("fault", ["sha", "safetensors", "missing_part"])
def test_a_bad_upload_is_refused_and_leaves_nothing(api, adapter_dir, fault):
    contents = adapter_files(adapter_dir)
    declared = dict(contents)
    if fault == "safetensors":  # declared honestly, but not a safetensors file
        contents[FILES[1]] = declared[FILES[1]] = b"\x00" * len(contents[FILES[1]])
    upload = start(api, "adapter", declared)
    if fault == "sha":
        contents[FILES[1]] = bytes([contents[FILES[1]][0] ^ 1]) + contents[FILES[1]][1:]
    if fault == "missing_part":
        upload["files"] = [item for item in upload["files"] if item["name"] == FILES[0]]
    put_parts(api, upload, contents)
    response = api.post(f"/v1/uploads/{upload['id']}/complete")
    assert response.status_code == 400, response.text
    expected = {"sha": "checksum_mismatch", "safetensors": "invalid_adapter", "missing_part": "upload_incomplete"}
    assert response.json()["error"]["code"] == expected[fault]
    assert api.get("/v1/adapters").json()["items"] == []
    assert staged(api) == []
    assert not list(api.app.state.records.storage.list_keys("tenants/tenant-a/adapters/"))
    assert api.get(f"/v1/uploads/{upload['id']}").status_code == 404


def test_dataset_and_model_through_presigned_parts(api):
    rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(4))
    upload = start(api, "dataset", {"rows.jsonl": rows}, name="rows")
    put_parts(api, upload, {"rows.jsonl": rows})
    dataset_id = api.post(f"/v1/uploads/{upload['id']}/complete").json()["result_id"]
    dataset = api.get(f"/v1/datasets/{dataset_id}")
    assert dataset.json()["rows"] == 4 and dataset.json()["sha256"] == hashlib.sha256(rows).hexdigest()
    archive = tiny_model_tar()
    upload = start(api, "model", {"model.tar.gz": archive})
    put_parts(api, upload, {"model.tar.gz": archive})
    done = api.post(f"/v1/uploads/{upload['id']}/complete")
    assert done.status_code == 200, done.text
    assert api.get(f"/v1/models/{done.json()['result_id']}").json()["family"]


@pytest.mark.parametrize(("files", "status"), [
    ([("adapter_config.json", 10), ("adapter_model.safetensors", 5 * 2**20)], 413),  # past max_upload_bytes
    ([("adapter_config.json", 10)], 422),
    ([("adapter_config.json", 10), ("adapter_model.bin", 10)], 415),
    ([("adapter_config.json", 10), ("../x", 10)], 422),
])
def test_declared_files_are_bounded_as_direct_uploads_are(api, files, status):
    body = {"kind": "adapter", "files": [{"name": n, "size": s, "sha256": "0" * 64} for n, s in files]}
    assert api.post("/v1/uploads", json=body).status_code == status
    assert staged(api) == []


def test_an_expired_or_deleted_upload_is_aborted(api, adapter_dir, monkeypatch):
    contents = adapter_files(adapter_dir)
    upload = start(api, "adapter", contents)
    assert api.delete(f"/v1/uploads/{upload['id']}").status_code == 204
    assert staged(api) == [] and api.get(f"/v1/uploads/{upload['id']}").status_code == 404
    monkeypatch.setattr(upload_sessions, "UPLOAD_TTL_SECONDS", -1)
    upload = start(api, "adapter", contents)
    put_parts(api, upload, contents)
    assert api.post(f"/v1/uploads/{upload['id']}/complete").status_code == 404
    assert staged(api) == []
    storage = api.app.state.records.storage
    assert not list(storage.list_keys("tenants/tenant-a/adapters/"))  # the weights staged in place too
    assert not storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads")


def test_a_second_complete_meanwhile_is_refused(api, adapter_dir):
    contents = adapter_files(adapter_dir)
    upload = start(api, "adapter", contents)
    put_parts(api, upload, contents)
    api.app.state.records.index.set(upload_sessions.completing_key(upload["id"]), "1")  # one is running
    response = api.post(f"/v1/uploads/{upload['id']}/complete")
    assert response.status_code == 409 and response.json()["error"]["code"] == "upload_busy"
    api.app.state.records.index.delete(upload_sessions.completing_key(upload["id"]))
    assert api.post(f"/v1/uploads/{upload['id']}/complete").json()["state"] == "completed"
