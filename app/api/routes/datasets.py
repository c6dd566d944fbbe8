"""Datasets: upload (validated, every row hashed), list, get, row manifest, delete."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi import Path as PathParam

from app.api.deps import Reader, RecordsDep, SettingsDep, Writer
from app.dataset_store import store_dataset
from app.errors import UnsupportedMediaType
from app.schemas.common import Page
from app.schemas.datasets import DatasetPublic, DatasetRecord
from app.schemas.jobs import ID_PATTERN
from app.storage import keys
from app.uploads import PICKLE_SUFFIXES, copy_bounded

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

DatasetId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=48)]


def get_dataset(dataset_id: DatasetId, caller: Reader, records: RecordsDep) -> DatasetRecord:
    return records.get_resource("datasets", caller.tenant, dataset_id)


DatasetDep = Annotated[DatasetRecord, Depends(get_dataset)]


@router.post("", status_code=201, response_model=DatasetPublic, summary="Upload a JSONL or safetensors dataset")
def upload_dataset(
    caller: Writer,
    records: RecordsDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="rows.jsonl, or data.safetensors (pixel_values + labels)")],
    name: Annotated[str | None, Form(min_length=1, max_length=128)] = None,
    num_labels: Annotated[int | None, Form(ge=1, le=1_000_000, description="For labelled rows.")] = None,
) -> DatasetPublic:
    filename = (file.filename or "").lower()
    if filename.endswith(PICKLE_SUFFIXES):
        raise UnsupportedMediaType(f"{file.filename!r} is a pickle file; upload JSONL or safetensors")
    with tempfile.TemporaryDirectory(prefix="amend-dataset-") as scratch:
        path = Path(scratch) / "data"
        sha256 = copy_bounded(file, path, settings.max_upload_bytes)
        record = store_dataset(records, settings, tenant=caller.tenant, path=path, filename=file.filename or "",
                               sha256=sha256, name=name, num_labels=num_labels)
    return record.public()


@router.get("", response_model=Page[DatasetPublic], summary="List datasets, newest first")
def list_datasets(
    caller: Reader,
    records: RecordsDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[DatasetPublic]:
    items, next_cursor = records.list_resources("datasets", caller.tenant, min(limit, settings.page_limit_max), cursor)
    return Page[DatasetPublic](items=[item.public() for item in items], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic, summary="Get a dataset")
def get_dataset_record(dataset: DatasetDep) -> DatasetPublic:
    return dataset.public()


@router.get("/{dataset_id}/manifest", summary="Row ids and row hashes (SHA-256 of each canonical row)")
def get_manifest(dataset: DatasetDep, records: RecordsDep) -> Any:
    return records.storage.get_json(keys.dataset(dataset.tenant, dataset.id, "manifest.json"))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset (409 while a job uses it)")
def delete_dataset(dataset: DatasetDep, caller: Writer, records: RecordsDep) -> None:
    records.delete_resource("datasets", caller.tenant, dataset.id)
