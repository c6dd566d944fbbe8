"""One publish path (`app.publish.publish`): files first, the record last; a failure anywhere in between leaves
no object in storage, nothing in the index and no bytes counted — for adapters, models and datasets alike."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from app.adapter_store import store_adapter
from app.checks.model import store_model
from app.errors import IndexUnavailable, NotFound, StorageUnavailable
from app.main import create_app
from app.publish import publish
from app.records import Records, new_id, now
from app.schemas.datasets import DatasetRecord
from app.settings import Settings
from app.storage import Storage
from tests.conftest import tenant_keys

TENANT = "t1"


@pytest.fixture
def records(unit_settings, redis_client, moto_s3) -> Records:
    storage = Storage(unit_settings)
    storage.ensure_bucket()
    return Records(storage, redis_client)


def stored(records: Records) -> list[str]:
    return sorted(records.storage.list_keys("tenants/"))


def dataset_record(dataset_id: str, size: int, sha256: str) -> DatasetRecord:
    return DatasetRecord(
        id=dataset_id, tenant=TENANT, name="d", kind="lm", format="jsonl", rows=1, size_bytes=size, sha256=sha256,
        created_at=now(),
    )


def publish_dataset(records: Records, data: Path, dataset_id: str) -> DatasetRecord:
    size = data.stat().st_size
    return publish(
        records,
        "datasets",
        tenant=TENANT,
        resource_id=dataset_id,
        files={"data.jsonl": data, "manifest.json": b'{"rows": 1}'},
        record=lambda digests: dataset_record(dataset_id, size, digests["data.jsonl"]),
        size=size,
        limit=1 << 20,
        hint="delete datasets first",
    )


def test_files_are_stored_under_the_id_then_the_record(records, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"text": "a"}\n')
    dataset_id = new_id("ds")
    record = publish_dataset(records, data, dataset_id)
    prefix = f"tenants/{TENANT}/datasets/{dataset_id}/"
    assert stored(records) == [prefix + name for name in ("data.jsonl", "manifest.json", "record.json")]
    assert records.storage.get_bytes(prefix + "data.jsonl") == data.read_bytes()
    assert records.get_resource("datasets", TENANT, dataset_id) == record
    assert records.stored_bytes(TENANT) == data.stat().st_size


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["second file", "record", "index after the record", "interrupt"])
def test_a_failure_mid_publish_leaves_nothing(records, tmp_path, monkeypatch, where):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"text": "a"}\n')
    dataset_id = new_id("ds")
    put_bytes, put_json = records.storage.put_bytes, records.storage.put_json

    def fail_on_manifest(key, *args, **kwargs):
        if key.endswith("manifest.json"):
            raise StorageUnavailable("storage went away")
        return put_bytes(key, *args, **kwargs)

    def fail_on_record(key, value):
        if where == "interrupt":
            raise KeyboardInterrupt
        raise Boom("the record write failed")

    def index_down(kind, record):
        raise IndexUnavailable("redis went away")

    if where == "second file":
        monkeypatch.setattr(records.storage, "put_bytes", fail_on_manifest)
    elif where == "index after the record":  # record.json is in storage when the index write fails
        monkeypatch.setattr(records, "_index_resource", index_down)
    else:
        monkeypatch.setattr(records.storage, "put_json", fail_on_record)
    expected = {"second file": StorageUnavailable, "record": Boom, "index after the record": IndexUnavailable,
                "interrupt": KeyboardInterrupt}[where]
    with pytest.raises(expected):
        publish_dataset(records, data, dataset_id)
    monkeypatch.setattr(records.storage, "put_json", put_json)
    assert stored(records) == []
    assert records.stored_bytes(TENANT) == 0
    with pytest.raises(NotFound):
        records.get_resource("datasets", TENANT, dataset_id)


def test_quota_is_checked_before_anything_is_stored(records, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"x" * 100)
    with pytest.raises(Exception, match="quota"):
        publish(
            records, "datasets", tenant=TENANT, resource_id=new_id("ds"), files={"data.jsonl": data},
            record=lambda digests: dataset_record("x", 100, digests["data.jsonl"]), size=100, limit=99, hint="h",
        )
    assert stored(records) == [] and records.stored_bytes(TENANT) == 0


def _fail_record_writes(monkeypatch) -> None:
    def fail(self, kind, record):
        raise StorageUnavailable("storage went away at the record write")

    monkeypatch.setattr(Records, "put_resource", fail)


def test_adapters_and_models_publish_by_the_same_path(records, unit_settings, adapter_dir, tmp_path, monkeypatch):
    directory = adapter_dir(r=4, alpha=8)
    config = json.loads((directory / "adapter_config.json").read_text())
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file({"model.embed_tokens.weight": np.ones((16, 4), dtype=np.float32)}, str(model / "model.safetensors"))
    files = {path.name: path for path in model.iterdir()}

    def adapter(adapter_id: str):
        return store_adapter(
            records, unit_settings, tenant=TENANT, adapter_id=adapter_id, name="a", config=config,
            weights=directory / "adapter_model.safetensors",
        )

    def model_(model_id: str):
        return store_model(
            records, unit_settings, tenant=TENANT, model_id=model_id, files=files, name="m", source="upload"
        )

    with monkeypatch.context() as patch:
        _fail_record_writes(patch)
        for store, prefix in ((adapter, "ad"), (model_, "md")):
            with pytest.raises(StorageUnavailable):
                store(new_id(prefix))
    assert stored(records) == [] and records.stored_bytes(TENANT) == 0
    adapter_record, model_record = adapter(new_id("ad")), model_(new_id("md"))
    prefix = f"tenants/{TENANT}/adapters/{adapter_record.id}/"
    weights = (directory / "adapter_model.safetensors").read_bytes()
    assert adapter_record.sha256 == hashlib.sha256(weights).hexdigest()
    config_bytes = records.storage.get_bytes(prefix + "adapter_config.json")
    assert adapter_record.config_sha256 == hashlib.sha256(config_bytes).hexdigest()
    keys = stored(records)
    assert prefix + "record.json" in keys
    assert f"tenants/{TENANT}/models/{model_record.id}/files/model.safetensors" in keys
    assert [f.name for f in model_record.files] == ["config.json", "model.safetensors"]


def test_a_dataset_upload_whose_record_write_fails_leaves_nothing(redis_url, redis_client, moto_s3, monkeypatch):
    key, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        _fail_record_writes(monkeypatch)
        response = client.post("/v1/datasets", files={"file": ("rows.jsonl", b'{"text": "a"}\n')})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert list(client.app.state.records.storage.list_keys("tenants/")) == []
