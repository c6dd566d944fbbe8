"""Models: register (a tar upload or a directory under AMEND_MODEL_ROOTS), list, get, download, delete."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from app.api.deps import Reader, RecordsDep, SettingsDep, Writer
from app.api.routes.versions import VersionQuery
from app.checks.model import collect_directory, store_archive, store_model
from app.deletion import versions
from app.deletion.versions import Asked
from app.errors import BadRequest, NotFound, Unprocessable, UnsupportedMediaType
from app.records import Records, new_id
from app.schemas.common import Page
from app.schemas.jobs import ID_PATTERN
from app.schemas.models import ModelFromPath, ModelPublic, ModelRecord, ModelVersionPublic
from app.settings import Settings
from app.storage import keys
from app.uploads import PICKLE_SUFFIXES, copy_bounded

router = APIRouter(prefix="/v1/models", tags=["models"])

ModelId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=48)]
MAX_JSON_BODY = 64 * 1024

_REGISTER_BODIES: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["archive"],
                    "properties": {
                        "archive": {"type": "string", "format": "binary",
                                    "description": "tar or tar.gz of config.json, *.safetensors, tokenizer files"},
                        "name": {"type": "string", "maxLength": 128},
                    },
                }
            },
            "application/json": {"schema": ModelFromPath.model_json_schema()},
        },
    }
}


def get_model(model_id: ModelId, caller: Reader, records: RecordsDep) -> ModelRecord:
    return records.get_resource("models", caller.tenant, model_id)


ModelDep = Annotated[ModelRecord, Depends(get_model)]
def model_version(model: ModelDep, records: RecordsDep, version: VersionQuery = None) -> Asked[ModelRecord]:
    read, number = versions.resolve(records, model.tenant, "model", model.id, version)
    found = model if read == model.id else records.get_resource("models", model.tenant, read)
    return Asked(model.id, number, found)


VersionDep = Annotated[Asked[ModelRecord], Depends(model_version)]


def _register_archive(
    upload: StarletteUploadFile, name: str, tenant: str, records: Records, settings: Settings
) -> ModelRecord:
    with tempfile.TemporaryDirectory(prefix="amend-model-") as scratch:
        archive = Path(scratch) / "archive"
        copy_bounded(upload, archive, settings.max_model_archive_bytes)  # type: ignore[arg-type]
        return store_archive(records, settings, tenant=tenant, model_id=new_id("md"), archive=archive,
                             scratch=Path(scratch), name=name)


def _register_path(spec: ModelFromPath, tenant: str, records: Records, settings: Settings) -> ModelRecord:
    files = collect_directory(
        spec.path, settings.model_roots, max_files=settings.max_model_files, max_bytes=settings.max_model_bytes
    )
    name = spec.name or Path(spec.path).name or "model"
    return store_model(records, settings, tenant=tenant, model_id=new_id("md"), files=files, name=name, source="path")


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    summary="Register a transformers model: multipart `archive` (tar/tar.gz) or JSON {path, name}",
    openapi_extra=_REGISTER_BODIES,
)
async def register_model(request: Request, caller: Writer, records: RecordsDep, settings: SettingsDep) -> ModelPublic:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4)
        try:
            archive, name = form.get("archive"), form.get("name")
            if not isinstance(archive, StarletteUploadFile):
                raise BadRequest("multipart upload needs a file field 'archive' (a tar or tar.gz of the model)")
            if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 128):
                raise Unprocessable("name must be 1..128 characters")
            if (archive.filename or "").lower().endswith(PICKLE_SUFFIXES):
                raise UnsupportedMediaType(
                    f"{archive.filename!r} is a pickle checkpoint; loading it would run code. Upload a tar of "
                    "config.json and *.safetensors instead."
                )
            record = await run_in_threadpool(
                _register_archive, archive, name or "model", caller.tenant, records, settings
            )
        finally:
            await form.close()
        return record.public()
    if content_type.startswith("application/json"):
        body = await request.body()
        if len(body) > MAX_JSON_BODY:
            raise Unprocessable("the JSON body is too large")
        try:
            spec = ModelFromPath.model_validate_json(body)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:10])
            raise Unprocessable(problems or "invalid body") from None
        record = await run_in_threadpool(_register_path, spec, caller.tenant, records, settings)
        return record.public()
    raise UnsupportedMediaType("send multipart/form-data with an 'archive' file, or JSON {\"path\", \"name\"}")


@router.get("", response_model=Page[ModelPublic], summary="List models, newest first")
def list_models(
    caller: Reader,
    records: RecordsDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[ModelPublic]:
    items, next_cursor = records.list_resources("models", caller.tenant, min(limit, settings.page_limit_max), cursor)
    return Page[ModelPublic](items=[item.public() for item in items], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelVersionPublic,
            summary="Get a model (its current version, or ?version=N)")
def get_model_record(found: VersionDep) -> ModelVersionPublic:
    return ModelVersionPublic(**found.record.public().model_dump(), version_of=found.target, version=found.number)


@router.get(
    "/{model_id}/files/{filename}",
    summary="Download one of a model's files (streamed; its current version, or ?version=N)",
    response_class=StreamingResponse,
    responses={200: {"description": "The file", "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def download_model_file(
    found: VersionDep, records: RecordsDep, filename: Annotated[str, PathParam(max_length=128)]
) -> StreamingResponse:
    model = found.record
    if filename not in {item.name for item in model.files}:
        raise NotFound(f"model {model.id} has no file {filename!r}")
    key = keys.model(model.tenant, model.id, f"files/{filename}")
    size = records.storage.size(key)
    return StreamingResponse(
        records.storage.iter_chunks(key),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.delete("/{model_id}", status_code=204, summary="Delete a model (409 while a job uses it)")
def delete_model(model: ModelDep, caller: Writer, records: RecordsDep) -> None:
    records.delete_resource("models", caller.tenant, model.id)


