"""The compact form of a sparsified, quantized adapter (`adapter_model.compact.safetensors`).

One safetensors file. For each factor, named like its PEFT tensor without `.weight`
(`base_model.model.<module>.lora_A`):
- `<factor>.mask`   uint8: the kept entries, one bit each, row-major, packed little-endian (numpy packbits);
- `<factor>.codes`  int8 (int8 mode): the kept entries' codes, row-major; or
  `<factor>.signs`  uint8 (ternary): one bit per kept entry, 1 = negative, packed the same way;
- `<factor>.scale`  float32: one scale (ternary) or one per row (int8).
The header's metadata holds a small manifest: `format` = "amend-compact", `version`, `bits`, `density`
and `shapes` (JSON: factor -> [rows, cols]). `adapter_config.json` is the PEFT adapter's own config.

`read_compact` returns each factor as the engine's `Quantized`; `dequantize` of it is bit-for-bit the
PEFT file's tensor, so the compact and PEFT forms hold the same adapter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.schemas.compress import COMPACT_FILE
from workers.engines.compress.sparsify_quantize import Quantized

__all__ = ["COMPACT_FILE", "CompactFormatError", "read_compact", "write_compact"]
FORMAT, VERSION = "amend-compact", "1"


class CompactFormatError(ValueError):
    """The file is not a readable compact adapter; the message says what."""


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy(), bitorder="little"))


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool))


def write_compact(path: Path, factors: Mapping[str, Quantized], bits: str, density: float) -> None:
    """Write `factors` (factor name -> Quantized, all of mode `bits`) as one compact safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, q in factors.items():
        shapes[name] = list(q.shape)
        tensors[f"{name}.mask"] = _pack(q.mask)
        if bits == "ternary":
            tensors[f"{name}.signs"] = _pack(q.codes < 0)
        else:
            tensors[f"{name}.codes"] = q.codes.contiguous()
        tensors[f"{name}.scale"] = q.scale.float().contiguous()
    metadata = {"format": FORMAT, "version": VERSION, "bits": bits, "density": repr(density),
                "shapes": json.dumps(shapes, separators=(",", ":"))}
    save_file(tensors, str(path), metadata=metadata)


def read_compact(path: Path) -> tuple[dict[str, Quantized], dict[str, str]]:
    """(factor name -> Quantized, the manifest) of a compact file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise CompactFormatError(f"{Path(path).name} is not an {FORMAT} v{VERSION} file")
        bits = metadata["bits"]
        factors = {}
        for name, shape in json.loads(metadata["shapes"]).items():
            rows, cols = int(shape[0]), int(shape[1])
            mask = _unpack(handle.get_tensor(f"{name}.mask"), rows * cols).reshape(rows, cols)
            kept = int(mask.sum())
            if bits == "ternary":
                negative = _unpack(handle.get_tensor(f"{name}.signs"), kept)
                codes = torch.where(negative, -1, 1).to(torch.int8)
            else:
                codes = handle.get_tensor(f"{name}.codes")
            factors[name] = Quantized(mask=mask, codes=codes, scale=handle.get_tensor(f"{name}.scale"), bits=bits)
    return factors, dict(metadata)
