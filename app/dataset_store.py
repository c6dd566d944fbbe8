"""Publish a dataset — a direct or a presigned upload: validate its rows, then `app.publish.publish` (the data
file and its row manifest, the record last; counted against the quota; undone on failure)."""

from __future__ import annotations

from pathlib import Path

from app.checks.dataset import validate_jsonl, validate_tensors
from app.publish import Stored, publish
from app.records import Records, new_id, now
from app.schemas.datasets import DATA_FILES, DatasetManifest, DatasetRecord
from app.settings import Settings


def store_dataset(
    records: Records,
    settings: Settings,
    *,
    tenant: str,
    path: Path,
    filename: str,
    sha256: str,
    name: str | None,
    num_labels: int | None,
    stored: Stored | None = None,
) -> DatasetRecord:
    """`filename` (as the client named it) picks the format: *.safetensors, else JSONL. `stored`: the file is
    already in the store there (a presigned upload; `path` is its local copy): published by a server-side copy."""
    if filename.lower().endswith(".safetensors"):
        summary = validate_tensors(
            path,
            num_labels=num_labels,
            max_rows=settings.max_dataset_rows,
            max_header_bytes=settings.max_safetensors_header_bytes,
            max_tensors=settings.max_tensors,
        )
    else:
        summary = validate_jsonl(
            path, num_labels=num_labels, max_rows=settings.max_dataset_rows,
            max_row_bytes=settings.max_dataset_row_bytes,
        )
    size = path.stat().st_size
    dataset_id = new_id("ds")
    record = DatasetRecord(
        id=dataset_id,
        tenant=tenant,
        name=name or Path(filename or "dataset").stem[:128] or "dataset",
        kind=summary.kind,  # type: ignore[arg-type]
        format=summary.format,  # type: ignore[arg-type]
        rows=summary.rows,
        num_labels=summary.num_labels,
        size_bytes=size,
        sha256=sha256,
        created_at=now(),
    )
    manifest = DatasetManifest(dataset_id=dataset_id, rows=summary.rows, row_sha256=summary.row_sha256)
    return publish(
        records,
        "datasets",
        tenant=tenant,
        resource_id=dataset_id,
        files={DATA_FILES[record.format]: stored or path, "manifest.json": manifest.model_dump_json().encode()},
        record=lambda _digests: record,
        size=size,
        limit=settings.max_bytes_per_tenant,
        hint="delete datasets first",
    )
