"""Datasets: rows to forget, retain or evaluate on. What is stored (`DatasetRecord`), what clients see
(`DatasetPublic`), and the row manifest (row id -> row hash) that lets an audit name deleted rows."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

# lm: {"prompt","completion"} or {"text"} rows; text_classification: {"text","label"} rows;
# image_classification: a safetensors file with pixel_values (float) and labels (int)
DatasetKind = Literal["lm", "text_classification", "image_classification"]
DatasetFormat = Literal["jsonl", "safetensors"]
# the data file of a dataset of each format, under keys.dataset(tenant, id, name): written by the upload,
# read by the workers
DATA_FILES: dict[DatasetFormat, str] = {"jsonl": "data.jsonl", "safetensors": "data.safetensors"}


class DatasetPublic(BaseModel):
    id: str
    name: str
    kind: DatasetKind
    format: DatasetFormat
    rows: int = Field(description="Row ids are 0..rows-1: the row's 0-based index in the file.")
    num_labels: int | None = None
    size_bytes: int
    sha256: str = Field(description="SHA-256 of the uploaded file.")
    created_at: datetime


class DatasetRecord(DatasetPublic):
    tenant: str
    deleted: bool = False

    def public(self) -> DatasetPublic:
        return DatasetPublic.model_validate(self.model_dump(include=set(DatasetPublic.model_fields)))


class DatasetManifest(BaseModel):
    """Row i's hash is the SHA-256 of its canonical form (see README); rows themselves are never copied."""

    dataset_id: str
    rows: int
    row_sha256: list[str]
