"""Validate a PEFT LoRA adapter before anything is stored — without torch.

The config must be a PEFT LoRA config; the weights a safetensors file whose header parses within limits,
whose tensors are float, contiguous and exactly fill the file, whose `lora_A`/`lora_B` pairs match the
config's rank (and `rank_pattern`, by PEFT's rule in `app.checks.peft_patterns`) and target modules, and
whose values are all finite. Pickle files never get this far: only the safetensors format is read, and only
as bytes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.checks.peft_patterns import PatternError, PeftPattern
from app.errors import AmendError, InvalidAdapter, PayloadTooLarge, UnsupportedMediaType

# dtype -> (bytes per element, numpy view, exponent mask): a value is finite when its exponent bits are not
# all set, which checks NaN and ±Inf for every float width with one rule.
_FLOAT_DTYPES: dict[str, tuple[int, Any, int]] = {
    "F64": (8, np.uint64, 0x7FF0000000000000),
    "F32": (4, np.uint32, 0x7F800000),
    "F16": (2, np.uint16, 0x7C00),
    "BF16": (2, np.uint16, 0x7F80),
}
FLOAT_DTYPES: frozenset[str] = frozenset(_FLOAT_DTYPES)
# integer and boolean tensors: model buffers (position ids), dataset labels and token ids
_OTHER_DTYPES: dict[str, int] = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ALL_DTYPES: frozenset[str] = FLOAT_DTYPES | frozenset(_OTHER_DTYPES)
INT_DTYPES: frozenset[str] = frozenset({"I64", "I32", "I16", "I8", "U8"})


def dtype_bytes(dtype: str) -> int:
    return _FLOAT_DTYPES[dtype][0] if dtype in _FLOAT_DTYPES else _OTHER_DTYPES[dtype]
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA adapters with lora_bias are not supported",
}
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class AdapterSummary:
    base_model: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    n_modules: int
    dtype: str
    use_rslora: bool


def parse_config(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"adapter_config.json is larger than {max_bytes} bytes")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter("adapter_config.json must be a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(f"only PEFT LoRA adapters are supported (peft_type {config.get('peft_type')!r})")
    for flag, message in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise InvalidAdapter(message)
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 4096:
        raise InvalidAdapter("adapter_config.json: r must be an integer in 1..4096")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha <= 1e6:
        raise InvalidAdapter("adapter_config.json: lora_alpha must be a positive number")
    rank_and_alpha_patterns(config)
    targets = config.get("target_modules")
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)) and not isinstance(
        targets, str
    ):
        raise InvalidAdapter("adapter_config.json: target_modules must be a list of names or a regex")
    return config


def read_header(
    path: Path,
    max_header_bytes: int,
    max_tensors: int,
    dtypes: frozenset[str] = FLOAT_DTYPES,
    error: type[AmendError] = InvalidAdapter,
) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: bounded size, allowed dtypes (float by default), offsets that
    tile the file. Problems raise `error` (InvalidAdapter by default; models and datasets pass their own)."""
    InvalidAdapter = error  # noqa: N806 - one name for the error class keeps the checks below readable
    size = path.stat().st_size
    with path.open("rb") as source:
        head = source.read(9)
        # a safetensors header (JSON) starts with "{" at byte 8; without it, pickle/zip magic means a checkpoint.
        # (With it, the magic is only a header length such as 0x0480, which a padded header may have.)
        if (head[:2] in _PICKLE_MAGIC or head[:4] in _PICKLE_MAGIC) and head[8:9] != b"{":
            raise UnsupportedMediaType("pickle/zip weights are refused: upload adapter_model.safetensors")
        head = head[:8]
        source.seek(len(head))
        if len(head) < 8:
            raise InvalidAdapter("weights file is truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > max_header_bytes:
            raise InvalidAdapter(f"safetensors header of {header_len} bytes exceeds the {max_header_bytes} limit")
        if 8 + header_len > size:
            raise InvalidAdapter("weights file is truncated: header runs past the end of the file")
        raw = source.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidAdapter("weights file is not safetensors: the header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidAdapter("safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    if len(header) > max_tensors:
        raise InvalidAdapter(f"safetensors file has {len(header)} tensors, more than the {max_tensors} limit")
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InvalidAdapter(f"tensor {name!r}: malformed header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in dtypes:
            if dtypes == FLOAT_DTYPES:
                raise InvalidAdapter(f"tensor {name!r}: dtype {dtype!r} is not a float type (F16, BF16, F32, F64)")
            raise InvalidAdapter(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(dtypes)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)):
            raise InvalidAdapter(f"tensor {name!r}: malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidAdapter(f"tensor {name!r}: malformed data_offsets")
        start, end = offsets
        count = 1
        for dim in shape:
            count *= dim
        if not 0 <= start <= end <= data_size or end - start != count * dtype_bytes(dtype):
            raise InvalidAdapter(
                f"tensor {name!r}: declares {count} elements at bytes {start}..{end}, "
                f"which does not fit the {data_size} data bytes (truncated or forged header)"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), start, end)
    covered = sorted((t.start, t.end) for t in tensors.values())
    position = 0
    for start, end in covered:
        if start != position:
            raise InvalidAdapter("safetensors tensors overlap or leave gaps")
        position = end
    if position != data_size:
        raise InvalidAdapter("safetensors data size does not match its header")
    return tensors


def check_finite(
    path: Path, tensors: dict[str, TensorInfo], header_offset: int, error: type[AmendError] = InvalidAdapter
) -> None:
    """Read each float tensor in bounded chunks and refuse NaN or infinite values (others are skipped)."""
    chunk_elements = 1 << 22
    with path.open("rb") as source:
        for name, info in tensors.items():
            if info.dtype not in _FLOAT_DTYPES:
                continue
            width, view, exponent = _FLOAT_DTYPES[info.dtype]
            source.seek(header_offset + info.start)
            remaining = (info.end - info.start) // width
            while remaining:
                take = min(remaining, chunk_elements)
                values = np.frombuffer(source.read(take * width), dtype=view)
                if np.any((values & view(exponent)) == view(exponent)):
                    raise error(f"tensor {name!r} contains NaN or infinite values")
                remaining -= take


def rank_and_alpha_patterns(config: dict[str, Any]) -> tuple[PeftPattern[Any], PeftPattern[Any]]:
    """The config's `rank_pattern` and `alpha_pattern`, compiled with PEFT's rule (`app.checks.peft_patterns`);
    refuses a pattern that is not an object, a key that is not a regular expression, and a value that is
    not a rank in 1..4096 / a positive alpha."""
    compiled = []
    for pattern_name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(pattern_name) or {}
        if not isinstance(pattern, dict):
            raise InvalidAdapter(f"adapter_config.json: {pattern_name} must be an object")
        for key, value in pattern.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidAdapter(f"adapter_config.json: {pattern_name}[{key!r}] must be a number")
            if pattern_name == "rank_pattern" and not (isinstance(value, int) and 1 <= value <= 4096):
                raise InvalidAdapter(f"adapter_config.json: rank_pattern[{key!r}] must be an integer in 1..4096")
            if pattern_name == "alpha_pattern" and not 0 < value <= 1e6:
                raise InvalidAdapter(f"adapter_config.json: alpha_pattern[{key!r}] must be a positive number")
        try:
            compiled.append(PeftPattern.compile(pattern, f"adapter_config.json: {pattern_name}"))
        except PatternError as error:
            raise InvalidAdapter(str(error)) from None
    return compiled[0], compiled[1]


def _targeted(module: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def validate_adapter(
    config: dict[str, Any], weights: Path, *, max_header_bytes: int, max_tensors: int
) -> AdapterSummary:
    """Check that the weights match the config; returns what the adapter record shows."""
    tensors = read_header(weights, max_header_bytes, max_tensors)
    with weights.open("rb") as source:
        (header_len,) = struct.unpack("<Q", source.read(8))
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        match = _LORA_KEY.match(name)
        if not match:
            raise InvalidAdapter(f"tensor {name!r} is not a LoRA factor (expected *.lora_A.weight / *.lora_B.weight)")
        if len(info.shape) != 2:
            raise InvalidAdapter(f"tensor {name!r} must be 2-D (conv and embedding LoRA are not supported)")
        pairs.setdefault(match["module"], {})[match["side"]] = info
    if not pairs:
        raise InvalidAdapter("the weights file holds no LoRA tensors")
    rank_default = int(config["r"])
    rank_pattern, _ = rank_and_alpha_patterns(config)
    targets = config["target_modules"]
    leaf_names: set[str] = set()
    dtypes = set()
    for module, sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            raise InvalidAdapter(f"module {module!r} has lora_{''.join(sides)} without its pair")
        lora_a, lora_b = sides["A"], sides["B"]
        stripped = module.removeprefix("base_model.model.")
        expected = int(rank_pattern.value(stripped, rank_default))
        if lora_a.shape[0] != expected or lora_b.shape[1] != expected:
            raise InvalidAdapter(
                f"module {stripped!r}: lora_A is {list(lora_a.shape)} and lora_B is {list(lora_b.shape)}, "
                f"but the config says rank {expected}"
            )
        if not _targeted(stripped, targets):
            raise InvalidAdapter(f"module {stripped!r} is not among the config's target_modules")
        leaf_names.add(stripped.rsplit(".", 1)[-1])
        dtypes.update({lora_a.dtype, lora_b.dtype})
    check_finite(weights, tensors, 8 + header_len)
    alpha = float(config.get("lora_alpha", rank_default))
    return AdapterSummary(
        base_model=config.get("base_model_name_or_path"),
        rank=rank_default,
        alpha=alpha,
        target_modules=sorted(leaf_names),
        n_modules=len(pairs),
        dtype="+".join(sorted(dtypes)),
        use_rslora=bool(config.get("use_rslora", False)),
    )
