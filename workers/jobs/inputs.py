"""A job's inputs, fetched from storage into its scratch directory: adapters, models, datasets.

Every fetched file is checked against the SHA-256 recorded when it was stored (hashed as it is written, not
read back), so a job computes on (and an audit record names) exactly the bytes that were uploaded; a mismatch
is `InputCorrupted` and the job makes no output. An input that no longer exists is `InputRejected`. A merge's
adapter weights stream into the merge instead (`streamed_inputs.py`), with the same check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from app.checks.model import check_name
from app.errors import NotFound
from app.records import Records
from app.schemas.adapters import AdapterRecord
from app.schemas.datasets import DATA_FILES, DatasetRecord
from app.schemas.models import ModelRecord
from app.storage import Storage, keys
from workers.jobs.context import InputCorrupted, InputRejected

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _fetch_checked(storage: Storage, key: str, path: Path, sha256: str, what: str) -> Path:
    """Download `key` to `path`, hashing the bytes as they are written (the file is not read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as sink:
        for chunk in storage.iter_chunks(key):
            digest.update(chunk)
            sink.write(chunk)
    if digest.hexdigest() != sha256:
        raise InputCorrupted(f"{what} does not match its recorded SHA-256")
    return path


def adapter_record(records: Records, tenant: str, adapter_id: str) -> AdapterRecord:
    try:
        return records.get_adapter(tenant, adapter_id)
    except NotFound:
        raise InputRejected(f"adapter {adapter_id} no longer exists") from None


def model_record(records: Records, tenant: str, model_id: str) -> ModelRecord:
    try:
        return records.get_resource("models", tenant, model_id)
    except NotFound:
        raise InputRejected(f"model {model_id} no longer exists") from None


def dataset_record(records: Records, tenant: str, dataset_id: str) -> DatasetRecord:
    try:
        return records.get_resource("datasets", tenant, dataset_id)
    except NotFound:
        raise InputRejected(f"dataset {dataset_id} no longer exists") from None


def fetch_adapter(records: Records, adapter: AdapterRecord, into: Path) -> tuple[dict[str, Any], Path]:
    """(config, weights path) of a stored adapter under `into/<id>/`, both files SHA-256-checked."""
    directory = into / adapter.id
    config = fetch_adapter_config(records, adapter, directory)
    weights = _fetch_checked(records.storage, keys.adapter(adapter.tenant, adapter.id, ADAPTER_FILES[1]),
                             directory / ADAPTER_FILES[1], adapter.sha256, f"adapter {adapter.id}")
    return config, weights


def fetch_adapter_config(records: Records, adapter: AdapterRecord, directory: Path) -> dict[str, Any]:
    """A stored adapter's config, SHA-256-checked, written to `directory/adapter_config.json`."""
    path = _fetch_checked(records.storage, keys.adapter(adapter.tenant, adapter.id, ADAPTER_FILES[0]),
                          directory / ADAPTER_FILES[0], adapter.config_sha256, f"adapter {adapter.id}'s config")
    return dict(json.loads(path.read_text()))


def fetch_model(records: Records, model: ModelRecord, into: Path) -> Path:
    """Download a model's files into `into`, each checked against the record's SHA-256."""
    into.mkdir(parents=True, exist_ok=True)
    for item in model.files:
        check_name(item.name)
        target = into / item.name
        _fetch_checked(records.storage, keys.model(model.tenant, model.id, f"files/{item.name}"), target,
                       item.sha256, f"model {model.id}: {item.name}")
    return into


def fetch_dataset(records: Records, dataset: DatasetRecord, into: Path) -> Path:
    path = into / f"{dataset.id}-{DATA_FILES[dataset.format]}"
    key = keys.dataset(dataset.tenant, dataset.id, DATA_FILES[dataset.format])
    return _fetch_checked(records.storage, key, path, dataset.sha256, f"dataset {dataset.id}")
