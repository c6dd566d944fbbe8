"""Adapters: upload (validated before anything is stored), list, get, download, delete."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from app.adapter_store import store_adapter
from app.api.deps import AdapterDep, Reader, RecordsDep, SettingsDep, Writer
from app.api.routes.versions import VersionQuery
from app.checks.adapter import parse_config
from app.deletion import versions
from app.deletion.versions import Asked
from app.errors import NotFound, Unprocessable, UnsupportedMediaType
from app.records import new_id
from app.schemas.adapters import AdapterPublic, AdapterRecord, AdapterVersionPublic
from app.schemas.common import Page
from app.schemas.compress import COMPACT_FILE
from app.storage import keys
from app.uploads import PICKLE_SUFFIXES, copy_bounded

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

def adapter_version(adapter: AdapterDep, records: RecordsDep, version: VersionQuery = None) -> Asked[AdapterRecord]:
    read, number = versions.resolve(records, adapter.tenant, "adapter", adapter.id, version)
    return Asked(adapter.id, number, adapter if read == adapter.id else records.get_adapter(adapter.tenant, read))


VersionDep = Annotated[Asked[AdapterRecord], Depends(adapter_version)]

ADAPTER_FILES = {"adapter_config.json": "application/json", "adapter_model.safetensors": "application/octet-stream"}


@router.post("", status_code=201, response_model=AdapterPublic, summary="Upload a PEFT LoRA adapter")
def upload_adapter(
    caller: Writer,
    records: RecordsDep,
    settings: SettingsDep,
    config: Annotated[UploadFile, File(description="adapter_config.json")],
    weights: Annotated[UploadFile, File(description="adapter_model.safetensors")],
    name: Annotated[str | None, Form(max_length=128)] = None,
) -> AdapterPublic:
    filename = (weights.filename or "").lower()
    if filename.endswith(PICKLE_SUFFIXES):
        raise UnsupportedMediaType(
            f"{weights.filename!r} is a pickle checkpoint; loading it would run code. "
            "Upload adapter_model.safetensors instead."
        )
    config_dict = parse_config(config.file.read(settings.max_config_bytes + 1), settings.max_config_bytes)
    with tempfile.TemporaryDirectory(prefix="amend-upload-") as scratch:
        weights_path = Path(scratch) / "adapter_model.safetensors"
        copy_bounded(weights, weights_path, settings.max_upload_bytes)
        record = store_adapter(
            records,
            settings,
            tenant=caller.tenant,
            adapter_id=new_id("ad"),
            name=name or "adapter",
            config=config_dict,
            weights=weights_path,
        )
    return record.public()


@router.get("", response_model=Page[AdapterPublic], summary="List adapters, newest first")
def list_adapters(
    caller: Reader,
    records: RecordsDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[AdapterPublic]:
    items, next_cursor = records.list_adapters(caller.tenant, min(limit, settings.page_limit_max), cursor)
    return Page[AdapterPublic](items=[item.public() for item in items], next_cursor=next_cursor)


@router.get("/{adapter_id}", response_model=AdapterVersionPublic,
            summary="Get an adapter (its current version, or ?version=N)")
def get_adapter(found: VersionDep) -> AdapterVersionPublic:
    return AdapterVersionPublic(**found.record.public().model_dump(), version_of=found.target, version=found.number)


@router.get(
    "/{adapter_id}/files/{filename}",
    summary="Download an adapter file (streamed; its current version, or ?version=N)",
    responses={200: {"description": "The file", "content": {
        "application/json": {}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def download_adapter_file(
    found: VersionDep,
    records: RecordsDep,
    filename: Literal["adapter_config.json", "adapter_model.safetensors"],
    format: Annotated[  # noqa: A002 - the query parameter's public name
        Literal["peft", "compact"],
        Query(description="adapter_model.safetensors as a PEFT file (default), or the compact form a "
                          "sparsify_quantize job stored (int8 codes, bit masks, float scales)"),
    ] = "peft",
) -> StreamingResponse:
    adapter = found.record
    stored: str = filename
    media_type = ADAPTER_FILES[filename]
    if format == "compact":
        if filename != "adapter_model.safetensors":
            raise Unprocessable("format=compact applies to adapter_model.safetensors only")
        stored = COMPACT_FILE
    key = keys.adapter(adapter.tenant, adapter.id, stored)
    if format == "compact" and not records.storage.exists(key):
        raise NotFound(f"adapter {adapter.id} has no compact form (a sparsify_quantize job's output has one)")
    size = records.storage.size(key)
    return StreamingResponse(
        records.storage.iter_chunks(key),
        media_type=media_type,
        headers={"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{stored}"'},
    )


@router.delete("/{adapter_id}", status_code=204, summary="Delete an adapter (409 while a job uses it)")
def delete_adapter(adapter: AdapterDep, caller: Writer, records: RecordsDep) -> None:
    records.delete_adapter(caller.tenant, adapter.id)

