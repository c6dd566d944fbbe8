"""Publish an adapter — an upload or a job's output — by one path: validate, store the files, write the
record last (publish by final PUT), count its bytes against the tenant's quota; on any failure remove what
was written and give the bytes back, so a half-stored adapter is never visible."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.checks.adapter import validate_adapter
from app.records import Records, now
from app.schemas.adapters import AdapterRecord
from app.settings import Settings
from app.storage import keys

log = logging.getLogger(__name__)
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


def store_adapter(
    records: Records,
    settings: Settings,
    *,
    tenant: str,
    adapter_id: str,
    name: str,
    config: dict[str, Any],
    weights: Path,
    source_job_id: str | None = None,
) -> AdapterRecord:
    config_bytes = stored_config(config)
    summary = validate_adapter(  # the config exactly as stored, so the worker reads what was checked
        json.loads(config_bytes),
        weights,
        max_header_bytes=settings.max_safetensors_header_bytes,
        max_tensors=settings.max_tensors,
    )
    size = weights.stat().st_size
    records.reserve_bytes(tenant, size, settings.max_bytes_per_tenant, "delete adapters first")
    try:
        config_sha256 = records.storage.put_bytes(keys.adapter(tenant, adapter_id, "adapter_config.json"), config_bytes)
        sha256 = records.storage.upload_path(keys.adapter(tenant, adapter_id, "adapter_model.safetensors"), weights)
        record = AdapterRecord(
            id=adapter_id,
            tenant=tenant,
            name=name,
            **asdict(summary),  # base_model, rank, alpha, target_modules, n_modules, dtype, use_rslora
            size_bytes=size,
            sha256=sha256,
            config_sha256=config_sha256,
            created_at=now(),
            source_job_id=source_job_id,
        )
        records.put_adapter(record)
    except BaseException:
        _discard(records, tenant, adapter_id)
        records.release_bytes(tenant, size)
        raise
    return record


def stored_config(config: dict[str, Any]) -> bytes:
    """adapter_config.json as stored: keys sorted at every level (as PEFT writes it), except the keys of
    `rank_pattern` and `alpha_pattern`, whose order is their precedence (the first matching key applies,
    `app.checks.peft_patterns`), so sorting them could change a module's rank or alpha."""

    def ordered(value: Any, keep_order: bool = False) -> Any:
        if isinstance(value, dict):
            items = value.items() if keep_order else sorted(value.items())
            return {key: ordered(item) for key, item in items}
        if isinstance(value, list):
            return [ordered(item) for item in value]
        return value

    canonical = {key: ordered(value, key in PATTERN_FIELDS) for key, value in sorted(config.items())}
    return json.dumps(canonical, indent=2).encode()


def _discard(records: Records, tenant: str, adapter_id: str) -> None:
    """Best effort: without its record nothing of a failed adapter is visible; this removes its files."""
    try:
        records.storage.delete_prefix(keys.adapter(tenant, adapter_id))
    except Exception as error:  # noqa: BLE001 - the original error is what the caller must see
        log.warning("could not remove a failed adapter's files", extra={"adapter_id": adapter_id, "error": str(error)})
