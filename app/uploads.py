"""What every upload route shares: refusing pickle files by name, and copying a body to disk within a limit
(so an upload is never held whole in memory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import UploadFile

from app.errors import PayloadTooLarge

# loading any of these runs code (pickle) or is not a format Amend reads
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


def copy_bounded(upload: UploadFile, target: Path, limit: int) -> str:
    """Copy an upload to a local file in chunks, refusing it past `limit` bytes; returns its SHA-256."""
    digest = hashlib.sha256()
    written = 0
    with target.open("wb") as sink:
        while chunk := upload.file.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise PayloadTooLarge(f"{upload.filename or 'upload'} is larger than {limit} bytes")
            digest.update(chunk)
            sink.write(chunk)
    return digest.hexdigest()
