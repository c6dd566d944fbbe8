"""Registered models: what is stored (`ModelRecord`) and what clients see (`ModelPublic`).

A model is a Hugging Face transformers model — `config.json`, `*.safetensors` weights and, optionally,
tokenizer files — registered from an uploaded tar or from a directory under an operator-configured root.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.lineage import Parent

ModelFamily = Literal["causal_lm", "classifier"]
ModelSource = Literal["upload", "path", "job"]


class ModelFile(BaseModel):
    name: str
    size: int
    sha256: str


class ModelFromPath(BaseModel):
    """`{"path": "/models/tiny-llama", "name": "tiny"}`: register a directory under AMEND_MODEL_ROOTS."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(None, min_length=1, max_length=128)


class ModelPublic(BaseModel):
    id: str
    name: str
    family: ModelFamily
    architecture: str
    model_type: str
    num_labels: int | None = Field(None, description="Classifiers: the number of output classes.")
    has_tokenizer: bool
    files: list[ModelFile]
    size_bytes: int
    sha256: str = Field(description="SHA-256 of the sorted file list with each file's SHA-256 (see README).")
    source: ModelSource
    created_at: datetime
    source_job_id: str | None = Field(None, description="The unlearning job that produced this model, if any.")
    parents: list[Parent] = Field(default_factory=list, description="What its job made it from (lineage).")


class ModelVersionPublic(ModelPublic):
    """The model asked for by id: the target's current version, or the one `?version=N` pins."""

    version_of: str = Field(description="The id asked for: the target this record is a version of.")
    version: int = Field(description="Which version of `version_of` this is (GET …/versions lists them).")


class ModelRecord(ModelPublic):
    tenant: str
    deleted: bool = False

    def public(self) -> ModelPublic:
        return ModelPublic.model_validate(self.model_dump(include=set(ModelPublic.model_fields)))
