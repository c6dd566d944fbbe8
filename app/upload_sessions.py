"""Presigned uploads: the client sends a file's bytes straight to the S3 store, in parallel parts, instead of
through the API process.

1. `create` checks what the client declares (kind, file names, sizes, SHA-256) against the same bounds as a
   direct upload, starts one S3 multipart upload per file under `keys.upload(tenant, id, "files/<n>")` (ids
   only, never the client's names), and writes the record `upload.json` with a deadline. `part_urls` signs
   one `upload_part` URL per part; the part size is the service's (`part_size`).
2. The client PUTs the parts; the store keeps their ETags.
3. `complete` lists the parts server-side and completes each multipart upload, streams every file to a
   scratch directory checking its size and SHA-256, then registers it exactly as a direct upload is
   registered: `store_adapter`, `store_archive` (models), `store_dataset` — the same validators, the one
   publish path. A checked adapter's weights or dataset file is published by a server-side copy of the staged
   object (`app.publish.Stored`), so those bytes cross the API process once, inbound, to be validated; a
   model's files are extracted from its tar and uploaded as a direct upload's are. On any failure nothing is
   registered and the staged files and the record are removed: a failed upload is over, the client starts a
   new one. On success the staged files are removed and the record stays, `completed` with the new
   resource's id, so a repeated `complete` answers the same.

Expiry: an open upload past `expires_at` (UPLOAD_TTL_SECONDS after it was made) is aborted when it is next
touched — read, completed, or when its tenant creates another upload (`sweep`). Its part URLs expire at the
same deadline, so nothing more can be written to it in the meantime. (A bucket lifecycle rule aborting
incomplete multipart uploads is the backstop for a tenant that never returns.)
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from app.adapter_store import store_adapter
from app.checks.adapter import parse_config
from app.checks.model import store_archive
from app.dataset_store import store_dataset
from app.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from app.publish import Stored, content_type_of
from app.records import PREFIX, Records, new_id, now, redis_errors
from app.schemas.uploads import StagedFile, UploadCreate, UploadPart, UploadRecord
from app.settings import Settings
from app.storage import keys
from app.uploads import PICKLE_SUFFIXES

log = logging.getLogger(__name__)

UPLOAD_TTL_SECONDS = 24 * 3600
MAX_OPEN_UPLOADS = 16  # per tenant
MAX_PARTS = 10_000  # S3's limit per multipart upload
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RECORD = "upload.json"


def part_size(settings: Settings, size: int) -> int:
    """The service's part size: the multipart chunk, larger only when a file would need more than MAX_PARTS."""
    return max(settings.s3_multipart_chunk, math.ceil(size / MAX_PARTS))


# the kinds whose upload stages a file where it will be published — its parts are written there, so publishing
# it takes a record, not a copy of its bytes: kind -> (the id prefix reserved, the key builder, those files)
IN_PLACE: dict[str, tuple[str, Callable[[str, str, str], str], frozenset[str]]] = {
    "adapter": ("ad", keys.adapter, frozenset({ADAPTER_FILES[1]})),
}


def _file_key(record: UploadRecord, index: int) -> str:
    return record.files[index].key or keys.upload(record.tenant, record.id, f"files/{index}")


def _staging(spec: UploadCreate, tenant: str, upload_id: str) -> tuple[str | None, list[str]]:
    """The resource id reserved for the upload (None when no file is staged in place) and each file's key."""
    own = [keys.upload(tenant, upload_id, f"files/{index}") for index in range(len(spec.files))]
    if spec.kind not in IN_PLACE:
        return None, own
    prefix, key_of, names = IN_PLACE[spec.kind]
    resource_id = new_id(prefix)
    return resource_id, [key_of(tenant, resource_id, item.name) if item.name in names else key
                         for item, key in zip(spec.files, own, strict=True)]


def _check(spec: UploadCreate, settings: Settings) -> None:
    """The bounds of the direct upload routes, applied to the declared files."""
    names = [item.name for item in spec.files]
    if len(set(names)) != len(names):
        raise Unprocessable("file names must differ")
    if any(name.lower().endswith(PICKLE_SUFFIXES) for name in names):
        raise UnsupportedMediaType("pickle files are refused: loading one would run code; upload safetensors")
    if spec.kind == "adapter":
        if sorted(names) != sorted(ADAPTER_FILES):
            raise Unprocessable(f"an adapter upload has exactly the files {', '.join(ADAPTER_FILES)}")
        limits = {ADAPTER_FILES[0]: settings.max_config_bytes, ADAPTER_FILES[1]: settings.max_upload_bytes}
    elif len(names) != 1:
        raise Unprocessable(f"a {spec.kind} upload has exactly one file")
    else:
        limit = settings.max_model_archive_bytes if spec.kind == "model" else settings.max_upload_bytes
        limits = {names[0]: limit}
    for item in spec.files:
        if item.size > limits[item.name]:
            raise PayloadTooLarge(f"{item.name} is larger than {limits[item.name]} bytes")
    if spec.num_labels is not None and spec.kind != "dataset":
        raise Unprocessable("num_labels applies to datasets only")


def create(records: Records, settings: Settings, tenant: str, spec: UploadCreate) -> UploadRecord:
    _check(spec, settings)
    if len(sweep(records, tenant)) >= MAX_OPEN_UPLOADS:
        raise Conflict(f"{MAX_OPEN_UPLOADS} uploads are open; complete or delete one first", code="too_many_uploads")
    upload_id, created = new_id("up"), now()
    storage = records.storage
    resource_id, file_keys = _staging(spec, tenant, upload_id)
    staged: list[StagedFile] = []
    try:
        for item, key in zip(spec.files, file_keys, strict=True):
            multipart_id = storage.start_multipart(key, content_type_of(item.name))
            staged.append(StagedFile(**item.model_dump(), part_size=part_size(settings, item.size),
                                     multipart_id=multipart_id, key=key))
        record = UploadRecord(
            id=upload_id, tenant=tenant, kind=spec.kind, name=spec.name, num_labels=spec.num_labels, files=staged,
            created_at=created, expires_at=created + timedelta(seconds=UPLOAD_TTL_SECONDS), resource_id=resource_id,
        )
        storage.put_json(keys.upload(tenant, upload_id, RECORD), record.model_dump(mode="json"))
    except BaseException:
        for item, key in zip(staged, file_keys, strict=False):
            storage.abort_multipart(key, item.multipart_id)
        raise
    return record


def part_urls(records: Records, record: UploadRecord) -> dict[str, list[UploadPart]]:
    """Signed PUT URLs for every part of every file, valid until the upload's deadline."""
    seconds = max(1, int((record.expires_at - now()).total_seconds()))
    out: dict[str, list[UploadPart]] = {}
    for index, item in enumerate(record.files):
        key = _file_key(record, index)
        out[item.name] = [
            UploadPart(number=n, url=records.storage.presign_part(key, item.multipart_id, n, seconds))
            for n in range(1, math.ceil(item.size / item.part_size) + 1)
        ]
    return out


def get(records: Records, tenant: str, upload_id: str) -> UploadRecord:
    """The tenant's upload (404 for another tenant's id, as for one that never existed); an open upload past
    its deadline is aborted and is then 404 too."""
    try:
        record = UploadRecord.model_validate(records.storage.get_json(keys.upload(tenant, upload_id, RECORD)))
    except NotFound:
        raise NotFound(f"upload {upload_id} not found") from None
    if record.state == "open" and record.expires_at <= now():
        discard(records, record)
        raise NotFound(f"upload {upload_id} expired at {record.expires_at.isoformat()}")
    return record


def sweep(records: Records, tenant: str) -> list[UploadRecord]:
    """Abort the tenant's expired open uploads; returns the ones still open."""
    still_open = []
    for key in list(records.storage.list_keys(keys.upload(tenant, ""))):
        if key.endswith("/" + RECORD):
            try:
                record = get(records, tenant, key.rsplit("/", 2)[-2])
            except NotFound:
                continue
            if record.state == "open":
                still_open.append(record)
    return still_open


def discard(records: Records, record: UploadRecord) -> None:
    """Abort an upload's multipart uploads and remove its staged files (those staged in place too: no record
    names them, so nothing shows them, and this removes them) and its record."""
    own = keys.upload(record.tenant, record.id)
    for index, item in enumerate(record.files):
        key = _file_key(record, index)
        records.storage.abort_multipart(key, item.multipart_id)
        if not key.startswith(own) and record.result_id is None:  # not once it is published
            records.storage.delete(key)
    records.storage.delete_prefix(own)


def completing_key(upload_id: str) -> str:
    return f"{PREFIX}upload:{upload_id}:completing"


def complete(records: Records, settings: Settings, record: UploadRecord) -> UploadRecord:
    if record.state == "completed":
        return record
    # one complete at a time: a second one would find the multipart uploads gone and discard the first's files
    claim = completing_key(record.id)
    with redis_errors():
        if not records.index.set(claim, "1", nx=True, ex=settings.job_time_limit):
            raise Conflict(f"upload {record.id} is being completed; get it to see the result", code="upload_busy")
    try:
        with tempfile.TemporaryDirectory(prefix="amend-presigned-") as scratch:
            paths = {item.name: _fetch(records, record, index, Path(scratch)) for index, item in
                     enumerate(record.files)}
            record.result_id = REGISTER[record.kind](records, settings, record, paths, Path(scratch))
        record.state = "completed"
        records.storage.put_json(keys.upload(record.tenant, record.id, RECORD), record.model_dump(mode="json"))
    except BaseException:
        discard(records, record)
        raise
    finally:
        with redis_errors():
            records.index.delete(claim)
    records.storage.delete_prefix(keys.upload(record.tenant, record.id, "files/"))
    return record


def _fetch(records: Records, record: UploadRecord, index: int, scratch: Path) -> Path:
    """Complete one file's multipart upload, then stream it to `scratch`, checking its size and SHA-256."""
    item, key = record.files[index], _file_key(record, index)
    if records.storage.finish_multipart(key, item.multipart_id) == 0:
        raise BadRequest(f"no parts of {item.name} were uploaded", code="upload_incomplete")
    path, digest, size = scratch / f"file-{index}", hashlib.sha256(), 0
    with path.open("wb") as sink:
        for chunk in records.storage.iter_chunks(key):
            size += len(chunk)
            if size > item.size:
                break
            digest.update(chunk)
            sink.write(chunk)
    if size != item.size:
        raise BadRequest(f"{item.name}: {'more' if size > item.size else size} bytes uploaded, {item.size} declared",
                         code="upload_incomplete")
    if digest.hexdigest() != item.sha256:
        raise BadRequest(f"{item.name}: the uploaded bytes' SHA-256 is {digest.hexdigest()}, {item.sha256} was "
                         "declared", code="checksum_mismatch")
    return path


def _stored(record: UploadRecord, name: str) -> Stored:
    """A staged file, its SHA-256 checked by `_fetch`: published where it is (staged in place) or by a
    server-side copy, never sent again."""
    index = [item.name for item in record.files].index(name)
    return Stored(_file_key(record, index), record.files[index].sha256)


def _adapter(records: Records, settings: Settings, record: UploadRecord, paths: dict[str, Path], _: Path) -> str:
    config = parse_config(paths[ADAPTER_FILES[0]].read_bytes(), settings.max_config_bytes)
    return store_adapter(records, settings, tenant=record.tenant, adapter_id=record.resource_id or new_id("ad"),
                         name=record.name or "adapter", config=config, weights=paths[ADAPTER_FILES[1]],
                         stored=_stored(record, ADAPTER_FILES[1])).id


def _model(records: Records, settings: Settings, record: UploadRecord, paths: dict[str, Path], scratch: Path) -> str:
    (archive,) = paths.values()
    return store_archive(records, settings, tenant=record.tenant, model_id=new_id("md"), archive=archive,
                         scratch=scratch, name=record.name or "model").id


def _dataset(records: Records, settings: Settings, record: UploadRecord, paths: dict[str, Path], _: Path) -> str:
    (item,) = record.files
    return store_dataset(records, settings, tenant=record.tenant, path=paths[item.name], filename=item.name,
                         sha256=item.sha256, name=record.name, num_labels=record.num_labels,
                         stored=_stored(record, item.name)).id


REGISTER: dict[str, Callable[[Records, Settings, UploadRecord, dict[str, Path], Path], str]] = {
    "adapter": _adapter, "model": _model, "dataset": _dataset,
}
