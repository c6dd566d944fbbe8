"""Versions of adapters and models made by scheduled unlearning (list, promote one to current) and their lineage
(ancestors and descendants)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from app.api.deps import AdapterDep, Reader, RecordsDep, Writer
from app.deletion import lineage, versions
from app.schemas.deletion import TargetVersionsPublic
from app.schemas.jobs import ID_PATTERN
from app.schemas.lineage import LineagePublic
from app.schemas.models import ModelRecord

router = APIRouter(tags=["versions"])

ModelId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=48)]
Version = Annotated[int, PathParam(ge=1, le=1_000_000)]


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


@router.post("/v1/adapters/{adapter_id}/versions/{version}/promote", response_model=TargetVersionsPublic,
             summary="Make a version of an adapter current")
def promote_adapter(adapter: AdapterDep, version: Version, caller: Writer, records: RecordsDep) -> TargetVersionsPublic:
    return versions.promote_version(records, caller.tenant, "adapter", adapter.id, version).public()


@router.post("/v1/models/{model_id}/versions/{version}/promote", response_model=TargetVersionsPublic,
             summary="Make a version of a model current")
def promote_model(model: ModelDep, version: Version, caller: Writer, records: RecordsDep) -> TargetVersionsPublic:
    return versions.promote_version(records, caller.tenant, "model", model.id, version).public()


@router.get("/v1/adapters/{adapter_id}/lineage", response_model=LineagePublic,
            summary="What an adapter was made from, and what was made from it")
def adapter_lineage(adapter: AdapterDep, records: RecordsDep) -> LineagePublic:
    return lineage.lineage(records, adapter.tenant, "adapter", adapter.id)


@router.get("/v1/models/{model_id}/lineage", response_model=LineagePublic,
            summary="What a model was made from, and what was made from it")
def model_lineage(model: ModelDep, records: RecordsDep) -> LineagePublic:
    return lineage.lineage(records, model.tenant, "model", model.id)
