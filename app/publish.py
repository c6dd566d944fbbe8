"""Publish an adapter, model or dataset by one path: files first, the record last, undo on failure.

`publish` counts the resource's bytes against the tenant's quota, stores its files under keys built from the
tenant and the resource id (`keys.adapter/model/dataset(tenant, id, name)`), then writes its record — the
final PUT, and only then is the resource visible (`Records.put_resource`). On any failure, including an
interrupted caller, everything under the resource's prefix is removed (best effort: without a record nothing
of it is visible anyway), the bytes are given back and the original error is raised.

What is published is validated before: `store_adapter` (app/adapter_store.py), `store_model`
(app/checks/model.py) and `store_dataset` (app/dataset_store.py) call their checks, then this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from app.storage import keys

if TYPE_CHECKING:
    from app.records import Records, Resource

log = logging.getLogger(__name__)

ResourceKind = Literal["adapters", "models", "datasets"]
R = TypeVar("R", bound="Resource")

@dataclass(frozen=True)
class Stored:
    """A file already in the store under `key` (a completed presigned upload, `app/upload_sessions.py`) whose
    bytes were checked to have this SHA-256: published by a server-side copy, never sent again."""

    key: str
    sha256: str


PREFIXES: dict[ResourceKind, Callable[..., str]] = {
    "adapters": keys.adapter,
    "models": keys.model,
    "datasets": keys.dataset,
}


def publish(
    records: Records,
    kind: ResourceKind,
    *,
    tenant: str,
    resource_id: str,
    files: Mapping[str, Path | bytes | Stored],
    record: Callable[[dict[str, str]], R],
    size: int,
    limit: int,
    hint: str,
) -> R:
    """Store `files` (name under the resource's prefix -> a path, streamed, or small bytes), then the record
    that `record` builds from the files' SHA-256 digests (name -> hex), last; returns that record.

    `size` bytes are reserved against the tenant's quota first (QuotaExceeded past `limit`, naming `hint`).
    Files named `*.json` are stored as application/json, the others as application/octet-stream.
    """
    records.reserve_bytes(tenant, size, limit, hint)
    key_of = PREFIXES[kind]
    try:
        digests: dict[str, str] = {}
        for name, content in files.items():
            key, content_type = key_of(tenant, resource_id, name), content_type_of(name)
            if isinstance(content, Path):
                digests[name] = records.storage.upload_path(key, content, content_type)
            elif isinstance(content, Stored):
                if content.key != key:  # a presigned upload's adapter weights were written where they belong
                    records.storage.copy(content.key, key, content_type)
                digests[name] = content.sha256
            else:
                digests[name] = records.storage.put_bytes(key, content, content_type)
        published = record(digests)
        records.put_resource(kind, published)
    except BaseException:
        _discard(records, kind, key_of(tenant, resource_id), resource_id)
        records.release_bytes(tenant, size)
        raise
    return published


def content_type_of(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def _discard(records: Records, kind: ResourceKind, prefix: str, resource_id: str) -> None:
    """Best effort: without its record nothing of a failed resource is visible; this removes its files."""
    try:
        records.storage.delete_prefix(prefix)
    except Exception as error:  # noqa: BLE001 - the original error is what the caller must see
        log.warning(
            "could not remove the files of a failed publish",
            extra={"kind": kind, "resource_id": resource_id, "error": str(error)},
        )
