"""Adapter records: what is stored (`AdapterRecord`) and what clients see (`AdapterPublic`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas.lineage import Parent


class AdapterPublic(BaseModel):
    id: str
    name: str
    base_model: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    n_modules: int
    dtype: str
    use_rslora: bool = False
    size_bytes: int
    sha256: str = Field(description="SHA-256 of adapter_model.safetensors.")
    created_at: datetime
    source_job_id: str | None = Field(None, description="The job that produced this adapter, if any.")
    parents: list[Parent] = Field(default_factory=list, description="What its job made it from (lineage).")


class AdapterVersionPublic(AdapterPublic):
    """The adapter asked for by id: the target's current version, or the one `?version=N` pins."""

    version_of: str = Field(description="The id asked for: the target this record is a version of.")
    version: int = Field(description="Which version of `version_of` this is (GET …/versions lists them).")


class AdapterRecord(AdapterPublic):
    tenant: str
    config_sha256: str
    deleted: bool = False

    def public(self) -> AdapterPublic:
        return AdapterPublic.model_validate(self.model_dump(include=set(AdapterPublic.model_fields)))
