"""Versions of adapters and models made by scheduled unlearning (list, promote one to current) and their lineage
(ancestors and descendants)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam

from app.api.deps import AdapterDep, Reader, RecordsDep, SettingsDep, Writer
from app.deletion import lineage, outcomes, versions
from app.schemas.deletion import TargetVersionsPublic
from app.schemas.jobs import ID_PATTERN
from app.schemas.lineage import LineagePublic
from app.schemas.models import ModelRecord

router = APIRouter(tags=["versions"])

ModelId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=48)]
Version = Annotated[int, PathParam(ge=1, le=1_000_000)]
VersionQuery = Annotated[int | None, Query(ge=1, le=1_000_000, description=(
    "Pin a version of the target (GET …/versions); without it, its current version."))]


def get_model(model_id: ModelId, caller: Reader, records: RecordsDep) -> ModelRecord:
    return records.get_resource("models", caller.tenant, model_id)


ModelDep = Annotated[ModelRecord, Depends(get_model)]


@router.get("/v1/adapters/{adapter_id}/versions", response_model=TargetVersionsPublic,
            summary="An adapter's versions and its current one")
def adapter_versions(adapter: AdapterDep, records: RecordsDep) -> TargetVersionsPublic:
    return versions.for_id(records, adapter.tenant, "adapter", adapter.id).public()


@router.get("/v1/models/{model_id}/versions", response_model=TargetVersionsPublic,
            summary="A model's versions and its current one")
def model_versions(model: ModelDep, records: RecordsDep) -> TargetVersionsPublic:
    return versions.for_id(records, model.tenant, "model", model.id).public()


def _promote(records: RecordsDep, settings: SettingsDep, tenant: str, kind: str, record_id: str,
             version: int) -> TargetVersionsPublic:
    found = versions.promote_version(records, tenant, kind, record_id, version)
    outcomes.promoted(records, settings, tenant, record_id, version)  # rebuilds, as its schedule says
    return found.public()


@router.post("/v1/adapters/{adapter_id}/versions/{version}/promote", response_model=TargetVersionsPublic,
             summary="Make a version of an adapter current (and rebuild its stale descendants, as its schedule says)")
def promote_adapter(adapter: AdapterDep, version: Version, caller: Writer, records: RecordsDep,
                    settings: SettingsDep) -> TargetVersionsPublic:
    return _promote(records, settings, caller.tenant, "adapter", adapter.id, version)


@router.post("/v1/models/{model_id}/versions/{version}/promote", response_model=TargetVersionsPublic,
             summary="Make a version of a model current (and rebuild its stale descendants, as its schedule says)")
def promote_model(model: ModelDep, version: Version, caller: Writer, records: RecordsDep,
                  settings: SettingsDep) -> TargetVersionsPublic:
    return _promote(records, settings, caller.tenant, "model", model.id, version)


@router.get("/v1/adapters/{adapter_id}/lineage", response_model=LineagePublic,
            summary="What an adapter (its current version, or ?version=N) was made from, and what was made from it")
def adapter_lineage(adapter: AdapterDep, records: RecordsDep, version: VersionQuery = None) -> LineagePublic:
    read, _ = versions.resolve(records, adapter.tenant, "adapter", adapter.id, version)
    return lineage.lineage(records, adapter.tenant, "adapter", read)


@router.get("/v1/models/{model_id}/lineage", response_model=LineagePublic,
            summary="What a model (its current version, or ?version=N) was made from, and what was made from it")
def model_lineage(model: ModelDep, records: RecordsDep, version: VersionQuery = None) -> LineagePublic:
    read, _ = versions.resolve(records, model.tenant, "model", model.id, version)
    return lineage.lineage(records, model.tenant, "model", read)
