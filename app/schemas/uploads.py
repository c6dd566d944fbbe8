"""Presigned uploads: what a client declares (`UploadCreate`), what is stored (`UploadRecord`) and what it
sees (`UploadPublic`, with the part URLs while the upload is open)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

UploadKind = Literal["adapter", "model", "dataset"]
UploadState = Literal["open", "completed"]


class UploadFileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                      description="adapter: adapter_config.json and adapter_model.safetensors; model: the tar or "
                                  "tar.gz; dataset: rows.jsonl or data.safetensors.")
    size: int = Field(ge=1, description="Bytes; bounded as a direct upload of the same kind is.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file, checked on completion.")


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: UploadKind
    files: list[UploadFileSpec] = Field(min_length=1, max_length=2)
    name: str | None = Field(None, min_length=1, max_length=128)
    num_labels: int | None = Field(None, ge=1, le=1_000_000, description="dataset only: for labelled rows.")


class UploadPart(BaseModel):
    number: int
    url: str = Field(description="PUT the part's bytes here (no auth header: the URL is signed).")


class UploadFilePublic(BaseModel):
    name: str
    size: int
    sha256: str
    part_size: int = Field(description="Every part but the last is exactly this many bytes.")
    parts: list[UploadPart] = Field(default_factory=list, description="Only in the answer that creates it.")


class UploadPublic(BaseModel):
    id: str
    kind: UploadKind
    state: UploadState
    expires_at: datetime
    files: list[UploadFilePublic]
    result_id: str | None = Field(None, description="The adapter, model or dataset it registered.")


class StagedFile(UploadFileSpec):
    part_size: int
    multipart_id: str
    # where the parts are written: an adapter's weights at their published key (no copy when published), other
    # files under the upload's own prefix; None in records made before this was kept (the upload's prefix)
    key: str | None = None


class UploadRecord(BaseModel):
    id: str
    tenant: str
    kind: UploadKind
    state: UploadState = "open"
    name: str | None = None
    num_labels: int | None = None
    files: list[StagedFile]
    created_at: datetime
    expires_at: datetime
    result_id: str | None = None
    resource_id: str | None = None  # reserved at creation when a file is staged at its published key

    def public(self, parts: dict[str, list[UploadPart]] | None = None) -> UploadPublic:
        return UploadPublic(
            id=self.id, kind=self.kind, state=self.state, expires_at=self.expires_at, result_id=self.result_id,
            files=[UploadFilePublic(name=f.name, size=f.size, sha256=f.sha256, part_size=f.part_size,
                                    parts=(parts or {}).get(f.name, [])) for f in self.files],
        )
