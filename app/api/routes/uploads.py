"""Presigned uploads (`app/upload_sessions.py`): create (part URLs on the S3 store), get, complete, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from app import upload_sessions
from app.api.deps import Reader, RecordsDep, SettingsDep, Writer
from app.schemas.jobs import ID_PATTERN
from app.schemas.uploads import UploadCreate, UploadPublic, UploadRecord

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

UploadId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=48)]


def get_upload(upload_id: UploadId, caller: Reader, records: RecordsDep) -> UploadRecord:
    return upload_sessions.get(records, caller.tenant, upload_id)


UploadDep = Annotated[UploadRecord, Depends(get_upload)]


@router.post("", status_code=201, response_model=UploadPublic,
             summary="Start a large upload: presigned part URLs on the object store, one list per file")
def create_upload(spec: UploadCreate, caller: Writer, records: RecordsDep, settings: SettingsDep) -> UploadPublic:
    record = upload_sessions.create(records, settings, caller.tenant, spec)
    return record.public(upload_sessions.part_urls(records, record))


@router.get("/{upload_id}", response_model=UploadPublic, summary="Get an upload (fresh part URLs while it is open)")
def get_upload_record(upload: UploadDep, records: RecordsDep) -> UploadPublic:
    return upload.public(upload_sessions.part_urls(records, upload) if upload.state == "open" else None)


@router.post("/{upload_id}/complete", response_model=UploadPublic,
             summary="Complete an upload: validate the stored files as a direct upload is, then register them")
def complete_upload(upload: UploadDep, caller: Writer, records: RecordsDep, settings: SettingsDep) -> UploadPublic:
    return upload_sessions.complete(records, settings, upload).public()


@router.delete("/{upload_id}", status_code=204, summary="Abort an upload and remove its staged parts")
def delete_upload(upload: UploadDep, caller: Writer, records: RecordsDep) -> None:
    upload_sessions.discard(records, upload)
