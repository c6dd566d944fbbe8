"""Publish an adapter — an upload or a job's output: validate it, then `app.publish.publish` (its files, then
the record last; counted against the tenant's quota; undone on failure), so a half-stored adapter is never
visible."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.checks.adapter import validate_adapter
from app.publish import Stored, publish
from app.records import Records, now
from app.schemas.adapters import AdapterRecord
from app.schemas.lineage import Parent
from app.settings import Settings

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
    parents: list[Parent] | None = None,
    stored: Stored | None = None,
) -> AdapterRecord:
    """`stored`: the weights are already in the store there (a presigned upload; `weights` is its local copy,
    which is validated): published by a server-side copy."""
    config_bytes = stored_config(config)
    summary = validate_adapter(  # the config exactly as stored, so the worker reads what was checked
        json.loads(config_bytes),
        weights,
        max_header_bytes=settings.max_safetensors_header_bytes,
        max_tensors=settings.max_tensors,
    )
    size = weights.stat().st_size

    def record(digests: dict[str, str]) -> AdapterRecord:
        return AdapterRecord(
            id=adapter_id,
            tenant=tenant,
            name=name,
            **asdict(summary),  # base_model, rank, alpha, target_modules, n_modules, dtype, use_rslora
            size_bytes=size,
            sha256=digests["adapter_model.safetensors"],
            config_sha256=digests["adapter_config.json"],
            created_at=now(),
            source_job_id=source_job_id,
            parents=parents or [],
        )

    return publish(
        records,
        "adapters",
        tenant=tenant,
        resource_id=adapter_id,
        files={"adapter_config.json": config_bytes, "adapter_model.safetensors": stored or weights},
        record=record,
        size=size,
        limit=settings.max_bytes_per_tenant,
        hint="delete adapters first",
    )


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
