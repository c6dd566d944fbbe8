"""safetensors files read and written with plain file I/O (no memory map, no intermediate byte copies).

`TensorFile` reads one tensor at a time with `readinto`, optionally straight into a caller's buffer (e.g. a
slice of a stacked factor matrix), so the file's pages are never mapped into the process and no temporary
tensor is allocated. `write_tensors` writes the header, then each tensor's bytes from its own memory.
A file still being downloaded can be read as it arrives: `TensorFile(path, arrival=wait)` calls `wait(start,
end)` with a tensor's absolute byte range before reading it (it returns once those bytes are in the file, or
raises why they never will be: `workers/jobs/streamed_inputs.py`).
Both follow the safetensors format: an 8-byte little-endian header length, a JSON header (space-padded to
8 bytes) mapping names to dtype, shape and data offsets, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20
Arrival = Callable[[int, int], None]  # wait(start, end): returns once bytes start..end-1 of the file are there


class TensorFileError(ValueError):
    """The file is not a readable safetensors file of float tensors; the message says what and where."""


class TensorFile:
    """One safetensors file open for reading; use as a context manager or call `close`."""

    def __init__(self, path: Path, arrival: Arrival | None = None) -> None:
        self.path = Path(path)
        self._arrival = arrival
        # unbuffered: a tensor is read straight into its buffer, and a file still arriving is never served
        # stale bytes from a read-ahead buffer filled before they came
        self._file = self.path.open("rb", buffering=0)
        try:
            self._entries = self._header()
        except BaseException:
            self._file.close()
            raise
        self._base = self._file.tell()

    def _header(self) -> dict[str, dict[str, Any]]:
        if self._arrival is not None:
            self._arrival(0, 8)
        raw = self._read_exactly(8)
        if len(raw) != 8:
            raise TensorFileError(f"{self.path.name}: not a safetensors file (no header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise TensorFileError(f"{self.path.name}: header of {length} bytes is larger than allowed")
        if self._arrival is not None:
            self._arrival(8, 8 + length)
        try:
            header = json.loads(self._read_exactly(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TensorFileError(f"{self.path.name}: the header is not JSON") from None
        header.pop("__metadata__", None)
        for key, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise TensorFileError(f"{self.path.name}: tensor {key!r} has unsupported dtype {entry.get('dtype')}")
            start, end = entry["data_offsets"]
            size = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
            if end - start != size or start < 0:
                raise TensorFileError(f"{self.path.name}: tensor {key!r} has inconsistent offsets and shape")
        return header

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entries[key]["dtype"]]

    def span(self, key: str) -> tuple[int, int]:
        """Tensor `key`'s bytes in the file: (start, end), absolute offsets."""
        start, end = self._entries[key]["data_offsets"]
        return self._base + start, self._base + end

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `key`. With `out` (contiguous, the tensor's dtype and number of elements) the bytes are read
        straight into it and `out` is returned, reshaped to the tensor's shape."""
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        if out is None:
            out = torch.empty(shape, dtype=dtype, device="cpu")  # a file read lands in host memory
        elif out.dtype != dtype or out.numel() != math.prod(shape) or not out.is_contiguous():
            raise ValueError(f"buffer for {key!r} must be a contiguous {dtype} tensor of {math.prod(shape)} elements")
        if self._arrival is not None:
            self._arrival(self._base + start, self._base + end)
        self._file.seek(self._base + start)
        view, filled = memoryview(out.reshape(-1).view(torch.uint8).numpy().data), 0
        while filled < end - start:
            count = self._file.readinto(view[filled:])
            if not count:
                raise TensorFileError(f"{self.path.name}: tensor {key!r} is truncated")
            filled += count
        return out.view(shape)

    def _read_exactly(self, size: int) -> bytes:
        """Up to `size` bytes from the current position (fewer only at the end of the file)."""
        parts, remaining = [], size
        while remaining:
            part = self._file.read(remaining)
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (contiguous, CPU, float dtypes) as a safetensors file, in the given order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _NAMES or not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError(f"tensor {key!r} must be a contiguous CPU tensor of a float dtype")
        end = offset + tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with Path(path).open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
