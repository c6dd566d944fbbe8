"""Validate an uploaded dataset before anything is stored — without torch — and hash every row.

- JSONL: one JSON object per line, all of one shape: `{"prompt", "completion"}` or `{"text"}` (kind `lm`,
  for causal language models), or `{"text", "label"}` (kind `text_classification`; `num_labels` is
  required and every label an int in 0..num_labels-1). Blank lines are skipped; a malformed line is refused
  with its 1-based line number. Row ids are the 0-based index of the row among the non-blank lines.
- safetensors (kind `image_classification`): exactly `pixel_values` (float, `(N, ...)`) and `labels`
  (int, `(N,)`), finite, labels in range; row i is index i.

Row hash: SHA-256 of the row's canonical JSON (sorted keys, compact, UTF-8). For a tensor row the
canonical JSON is `{"label": l, "pixel_values": {"dtype", "shape", "sha256": <SHA-256 of its bytes>}}`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.audit import canonical_json
from app.checks.adapter import ALL_DTYPES, FLOAT_DTYPES, INT_DTYPES, check_finite, read_header
from app.errors import InvalidDataset, PayloadTooLarge

_SHAPES: dict[frozenset[str], str] = {
    frozenset({"prompt", "completion"}): "lm",
    frozenset({"text"}): "lm",
    frozenset({"text", "label"}): "text_classification",
}
_NUMPY_INT = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}


@dataclass(frozen=True)
class DatasetSummary:
    kind: str
    format: str
    rows: int
    num_labels: int | None
    row_sha256: list[str]


def row_sha256(row: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(row)).hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_label(label: Any, num_labels: int | None, where: str) -> None:
    if not isinstance(label, int) or isinstance(label, bool):
        raise InvalidDataset(f"{where}: label must be an integer, got {label!r}")
    if num_labels is None:
        raise InvalidDataset("labelled rows need the num_labels form field")
    if not 0 <= label < num_labels:
        raise InvalidDataset(f"{where}: label {label} is outside 0..{num_labels - 1}")


def validate_jsonl(path: Path, *, num_labels: int | None, max_rows: int, max_row_bytes: int) -> DatasetSummary:
    hashes: list[str] = []
    shape: frozenset[str] | None = None
    with path.open("rb") as source:
        number = 0
        while line := source.readline(max_row_bytes + 2):
            number += 1
            body = line.rstrip(b"\r\n")
            if len(body) > max_row_bytes:
                raise PayloadTooLarge(f"line {number} is longer than {max_row_bytes} bytes")
            if not body.strip():
                continue
            try:
                row = json.loads(body, parse_constant=_refuse_constant)
            except (UnicodeDecodeError, ValueError) as error:
                raise InvalidDataset(f"line {number} is not valid JSON: {error}") from None
            if not isinstance(row, dict):
                raise InvalidDataset(f"line {number}: each line must be a JSON object")
            keys = frozenset(row)
            if keys not in _SHAPES:
                raise InvalidDataset(
                    f"line {number}: expected keys prompt+completion, text, or text+label; got {sorted(keys)}"
                )
            if shape is None:
                shape = keys
            elif keys != shape:
                raise InvalidDataset(f"line {number}: keys {sorted(keys)} differ from the first row's {sorted(shape)}")
            for key in keys - {"label"}:
                if not isinstance(row[key], str):
                    raise InvalidDataset(f"line {number}: {key} must be a string")
            if "label" in row:
                _check_label(row["label"], num_labels, f"line {number}")
            if len(hashes) >= max_rows:
                raise PayloadTooLarge(f"the dataset has more than {max_rows} rows")
            hashes.append(row_sha256(row))
    if shape is None:
        raise InvalidDataset("the dataset has no rows")
    kind = _SHAPES[shape]
    if kind == "lm" and num_labels is not None:
        raise InvalidDataset("num_labels is only for labelled rows ({text, label})")
    return DatasetSummary(kind, "jsonl", len(hashes), num_labels if kind != "lm" else None, hashes)


def validate_tensors(
    path: Path, *, num_labels: int | None, max_rows: int, max_header_bytes: int, max_tensors: int
) -> DatasetSummary:
    tensors = read_header(path, max_header_bytes, max_tensors, dtypes=ALL_DTYPES, error=InvalidDataset)
    if set(tensors) != {"pixel_values", "labels"}:
        raise InvalidDataset(f"expected tensors pixel_values and labels, got {sorted(tensors)}")
    pixels, labels = tensors["pixel_values"], tensors["labels"]
    if pixels.dtype not in FLOAT_DTYPES or len(pixels.shape) < 2:
        raise InvalidDataset("pixel_values must be a float tensor of shape (N, ...)")
    if labels.dtype not in INT_DTYPES or len(labels.shape) != 1:
        raise InvalidDataset("labels must be a 1-D integer tensor")
    count = labels.shape[0]
    if pixels.shape[0] != count:
        raise InvalidDataset(f"pixel_values has {pixels.shape[0]} rows, labels {count}")
    if count == 0:
        raise InvalidDataset("the dataset has no rows")
    if count > max_rows:
        raise PayloadTooLarge(f"the dataset has more than {max_rows} rows")
    if num_labels is None:
        raise InvalidDataset("image classification data needs the num_labels form field")
    with path.open("rb") as source:
        (header_len,) = struct.unpack("<Q", source.read(8))
        offset = 8 + header_len
        check_finite(path, tensors, offset, error=InvalidDataset)
        source.seek(offset + labels.start)
        values = np.frombuffer(source.read(labels.end - labels.start), dtype=_NUMPY_INT[labels.dtype])
        for index, label in enumerate(values.tolist()):
            _check_label(int(label), num_labels, f"row {index}")
        row_bytes = (pixels.end - pixels.start) // count
        row_shape = list(pixels.shape[1:])
        source.seek(offset + pixels.start)
        hashes = []
        for index in range(count):
            digest = hashlib.sha256(source.read(row_bytes)).hexdigest()
            row = {"label": int(values[index]), "pixel_values": {"dtype": pixels.dtype, "shape": row_shape,
                                                                 "sha256": digest}}
            hashes.append(row_sha256(row))
    return DatasetSummary("image_classification", "safetensors", count, num_labels, hashes)
