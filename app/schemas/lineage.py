"""Lineage: what each adapter or model was made from (`Parent`, stored on its record when it is published) and
what `GET /v1/{adapters|models}/{id}/lineage` returns."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ParentKind = Literal["adapter", "model", "dataset", "request"]


class Parent(BaseModel):
    kind: ParentKind
    id: str
    role: str = Field(description="input | base_model | model | predecessor | forget | learn | retain | eval | request")
    version_of: str | None = Field(None, description="Adapters and models: the target this id is a version of.")
    version: int | None = Field(None, description="Adapters and models: which version of `version_of` it is.")


class LineageNode(BaseModel):
    id: str
    kind: Literal["adapter", "model"]
    name: str
    source_job_id: str | None = None
    job_type: str | None = Field(None, description="The type of the job that made it (merge, compress, unlearn).")
    parents: list[Parent] = Field(default_factory=list)


class LineagePublic(BaseModel):
    id: str
    kind: Literal["adapter", "model"]
    parents: list[Parent] = Field(description="Its direct parents (adapters, models, datasets, requests).")
    ancestors: list[LineageNode] = Field(description="Every adapter and model it was made from, nearest first.")
    descendants: list[LineageNode] = Field(description="Every adapter and model made from it, nearest first.")
