"""Adapters: upload (validated before anything is stored), list, get, download, delete."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from app.adapter_check import parse_config, validate_adapter
from app.api.deps import AdapterDep, Reader, RecordsDep, SettingsDep, Writer
from app.errors import PayloadTooLarge, UnsupportedMediaType
from app.records import new_id, now
from app.schemas.adapters import AdapterPublic, AdapterRecord
from app.schemas.common import Page
from app.storage import keys

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ADAPTER_FILES = {"adapter_config.json": "application/json", "adapter_model.safetensors": "application/octet-stream"}


def _copy_bounded(upload: UploadFile, target: Path, limit: int) -> str:
    """Copy an upload to a local file in chunks, refusing it past `limit` bytes; returns its SHA-256."""
    digest = hashlib.sha256()
    written = 0
    with target.open("wb") as sink:
        while chunk := upload.file.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise PayloadTooLarge(f"{upload.filename or 'upload'} is larger than {limit} bytes")
            digest.update(chunk)
            sink.write(chunk)
    return digest.hexdigest()


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
        sha256 = _copy_bounded(weights, weights_path, settings.max_upload_bytes)
        summary = validate_adapter(
            config_dict,
            weights_path,
            max_header_bytes=settings.max_safetensors_header_bytes,
            max_tensors=settings.max_tensors,
        )
        size = weights_path.stat().st_size
        adapter_id = new_id("ad")
        config_bytes = _canonical_config(config_dict)
        records.reserve_bytes(caller.tenant, size, settings.max_bytes_per_tenant, "delete adapters first")
        try:
            records.storage.put_bytes(keys.adapter(caller.tenant, adapter_id, "adapter_config.json"), config_bytes)
            weights_key = keys.adapter(caller.tenant, adapter_id, "adapter_model.safetensors")
            records.storage.upload_path(weights_key, weights_path)
            record = AdapterRecord(
                id=adapter_id,
                tenant=caller.tenant,
                name=name or "adapter",
                base_model=summary.base_model,
                rank=summary.rank,
                alpha=summary.alpha,
                target_modules=summary.target_modules,
                n_modules=summary.n_modules,
                dtype=summary.dtype,
                use_rslora=summary.use_rslora,
                size_bytes=size,
                sha256=sha256,
                config_sha256=hashlib.sha256(config_bytes).hexdigest(),
                created_at=now(),
            )
            records.put_adapter(record)
        except BaseException:
            _discard(records, caller.tenant, adapter_id)
            records.release_bytes(caller.tenant, size)
            raise
    return record.public()


def _canonical_config(config: dict) -> bytes:
    return json.dumps(config, indent=2, sort_keys=True).encode()


def _discard(records: RecordsDep, tenant: str, adapter_id: str) -> None:
    """Best effort: remove what a failed upload wrote. Without its record nothing of it is visible."""
    try:
        records.storage.delete_prefix(keys.adapter(tenant, adapter_id))
    except Exception:  # noqa: BLE001 - the original error is what the client must see
        pass


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


@router.get("/{adapter_id}", response_model=AdapterPublic, summary="Get an adapter")
def get_adapter(adapter: AdapterDep) -> AdapterPublic:
    return adapter.public()


@router.get(
    "/{adapter_id}/files/{filename}",
    summary="Download an adapter file (streamed)",
    responses={200: {"description": "The file", "content": {
        "application/json": {}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def download_adapter_file(
    adapter: AdapterDep,
    records: RecordsDep,
    filename: Literal["adapter_config.json", "adapter_model.safetensors"],
) -> StreamingResponse:
    key = keys.adapter(adapter.tenant, adapter.id, filename)
    size = records.storage.size(key)
    return StreamingResponse(
        records.storage.iter_chunks(key),
        media_type=ADAPTER_FILES[filename],
        headers={"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.delete("/{adapter_id}", status_code=204, summary="Delete an adapter (409 while a job uses it)")
def delete_adapter(adapter: AdapterDep, caller: Writer, records: RecordsDep) -> None:
    records.delete_adapter(caller.tenant, adapter.id)

