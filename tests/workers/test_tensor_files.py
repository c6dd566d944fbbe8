"""Plain-I/O safetensors reader and writer, checked against the safetensors library itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workers.formats.tensor_files import TensorFile, TensorFileError, write_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "m.lora_A.weight": torch.randn(4, 8, generator=gen).to(dtype),
        "m.lora_B.weight": torch.randn(8, 4, generator=gen).to(dtype),
        "scalar": torch.tensor(3.5, dtype=dtype),
        "empty": torch.zeros(0, 5, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_reader_matches_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _tensors(dtype)
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with TensorFile(path) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for key, value in tensors.items():
            assert reader.dtype(key) == dtype and reader.shape(key) == tuple(value.shape)
            read = reader.read(key)
            assert read.dtype == dtype and read.shape == value.shape and torch.equal(read, value)
        # straight into a slice of a larger buffer: only that slice is written
        buffer = torch.full((6, 8), -1.0, dtype=dtype)
        into = reader.read("m.lora_A.weight", out=buffer[1:5])
        assert into.data_ptr() == buffer[1].data_ptr()
        assert torch.equal(buffer[1:5], tensors["m.lora_A.weight"]) and bool((buffer[[0, 5]] == -1).all())
        with pytest.raises(ValueError, match="contiguous"):
            reader.read("m.lora_B.weight", out=torch.empty(8, 8, dtype=dtype)[:, :4])
        with pytest.raises(ValueError, match="elements"):
            reader.read("m.lora_B.weight", out=torch.empty(31, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_writer_output_loads_with_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _tensors(dtype)
    path = tmp_path / "b.safetensors"
    write_tensors(path, tensors, metadata={"format": "pt"})
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == dtype and torch.equal(loaded[key], value)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert length % 8 == 0


def test_writer_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        write_tensors(tmp_path / "c.safetensors", {"t": torch.randn(4, 4).mT})
    with pytest.raises(ValueError, match="float"):
        write_tensors(tmp_path / "c.safetensors", {"t": torch.arange(3)})


def test_reader_refuses_truncated_and_inconsistent_files(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file(_tensors(torch.float32), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-6])
    with TensorFile(path) as truncated:
        last = max(truncated.keys(), key=lambda k: truncated._entries[k]["data_offsets"][1])
        with pytest.raises(TensorFileError, match="truncated"):
            truncated.read(last)
    header = {"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(64))
    with pytest.raises(TensorFileError, match="inconsistent"):
        TensorFile(path)
    header = {"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(8))
    with pytest.raises(TensorFileError, match="dtype"):
        TensorFile(path)
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(TensorFileError, match="header"):
        TensorFile(path)
    path.write_bytes(b"abc")
    with pytest.raises(TensorFileError, match="not a safetensors"):
        TensorFile(path)
