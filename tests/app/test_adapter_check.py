"""Upload validation, without torch in app/: every refusal names what is wrong."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.checks.adapter import parse_config, validate_adapter
from app.errors import InvalidAdapter, PayloadTooLarge, UnsupportedMediaType

LIMITS = dict(max_header_bytes=1 << 20, max_tensors=1000)


def _config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def test_valid_adapter_summary(adapter_dir):
    directory = adapter_dir(r=4, alpha=8)
    summary = validate_adapter(_config(directory), directory / "adapter_model.safetensors", **LIMITS)
    assert summary.rank == 4 and summary.alpha == 8
    assert summary.target_modules == ["q_proj", "v_proj"]
    assert summary.n_modules == 4  # 2 layers × q, v
    assert summary.base_model == "tiny-llama"


def test_pickle_weights_refused(tmp_path, adapter_dir):
    directory = adapter_dir()
    pickled = tmp_path / "adapter_model.safetensors"
    torch.save({"x": torch.zeros(2)}, pickled)  # a zip/pickle file under a safetensors name
    with pytest.raises(UnsupportedMediaType):
        validate_adapter(_config(directory), pickled, **LIMITS)


def test_truncated_file_refused(tmp_path, adapter_dir):
    directory = adapter_dir()
    data = (directory / "adapter_model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    with pytest.raises(InvalidAdapter, match="does not fit|truncated|data size"):
        validate_adapter(_config(directory), cut, **LIMITS)


def test_header_claiming_huge_tensor_refused(tmp_path, adapter_dir):
    header = json.dumps(
        {"base_model.model.x.q_proj.lora_A.weight": {"dtype": "F32", "shape": [100000, 100000],
                                                      "data_offsets": [0, 40000000000]}}
    ).encode()
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(InvalidAdapter, match="does not fit"):
        validate_adapter(_config(adapter_dir()), forged, **LIMITS)


def test_header_length_over_limit_refused(tmp_path, adapter_dir):
    forged = tmp_path / "big-header.safetensors"
    forged.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidAdapter, match="header"):
        validate_adapter(_config(adapter_dir()), forged, **LIMITS)


def test_rank_mismatch_refused(adapter_dir):
    directory = adapter_dir(r=4)
    config = _config(directory) | {"r": 8}
    with pytest.raises(InvalidAdapter, match="rank 8"):
        validate_adapter(config, directory / "adapter_model.safetensors", **LIMITS)


def test_nan_weights_refused(tmp_path, adapter_dir):
    directory = adapter_dir()
    from safetensors.torch import load_file

    tensors = load_file(directory / "adapter_model.safetensors")
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad)
    with pytest.raises(InvalidAdapter, match="NaN"):
        validate_adapter(_config(directory), bad, **LIMITS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inf_refused(tmp_path, adapter_dir, dtype):
    directory = adapter_dir()
    from safetensors.torch import load_file

    tensors = {k: v.to(dtype) for k, v in load_file(directory / "adapter_model.safetensors").items()}
    good = tmp_path / "good.safetensors"
    save_file(tensors, good)
    validate_adapter(_config(directory), good, **LIMITS)
    name = next(iter(tensors))
    tensors[name][1, 1] = float("inf")
    bad = tmp_path / "inf.safetensors"
    save_file(tensors, bad)
    with pytest.raises(InvalidAdapter, match="NaN or infinite"):
        validate_adapter(_config(directory), bad, **LIMITS)


def test_integer_tensors_refused(tmp_path, adapter_dir):
    directory = adapter_dir()
    bad = tmp_path / "int.safetensors"
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8, dtype=torch.int32)}, bad)
    with pytest.raises(InvalidAdapter, match="not a float type"):
        validate_adapter(_config(directory), bad, **LIMITS)


def test_unpaired_factor_refused(tmp_path, adapter_dir):
    directory = adapter_dir()
    bad = tmp_path / "half.safetensors"
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, bad)
    with pytest.raises(InvalidAdapter, match="without its pair"):
        validate_adapter(_config(directory), bad, **LIMITS)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peft_type": "IA3"}, "only PEFT LoRA"),
        ({"use_dora": True}, "DoRA"),
        ({"r": 0}, "r must be"),
        ({"lora_alpha": -1}, "lora_alpha"),
    ],
)
def test_config_refusals(adapter_dir, change, message):
    config = _config(adapter_dir()) | change
    with pytest.raises(InvalidAdapter, match=message):
        parse_config(json.dumps(config).encode(), 1 << 16)


def test_config_too_large_and_not_json():
    with pytest.raises(PayloadTooLarge):
        parse_config(b"{" + b" " * 2000 + b"}", 1024)
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        parse_config(b"\x80\x04pickle", 1024)
