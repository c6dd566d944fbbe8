"""Admission checks of a compression job: the inputs exist for this tenant and fit the job.

- an adapter method: the adapter exists; a parameter or byte budget buys at least one rank-1 module (the
  shapes come from the stored file's safetensors header, read with one ranged GET — no tensor is read);
- `extract`: both models exist, have the same architecture and model type, and their weights the same
  names and shapes (from the stored files' headers), so no compute starts on models that cannot be diffed.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

from app.errors import Unprocessable
from app.records import Records
from app.schemas.jobs import CompressJobCreate
from app.schemas.models import ModelRecord
from app.settings import Settings
from app.storage import keys

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def check(records: Records, settings: Settings, tenant: str, spec: CompressJobCreate) -> None:
    if spec.method == "extract":
        _check_models(records, settings, tenant, spec)
        return
    adapter = records.get_adapter(tenant, str(spec.adapter))
    budget_params, budget_bytes = spec.output.budget_params, spec.output.budget_bytes
    if budget_params is None and budget_bytes is None:
        return
    header = safetensors_header(records, keys.adapter(tenant, adapter.id, "adapter_model.safetensors"), settings)
    costs, dtypes = adapter_costs(header)
    cheapest = min(costs.values())
    if budget_params is not None and budget_params < cheapest:
        raise Unprocessable(
            f"budget_params {budget_params} is smaller than one rank-1 module of adapter {adapter.id} "
            f"({cheapest} parameters: m + n of its smallest module)",
            code="budget_too_small",
        )
    if budget_bytes is not None:
        width = output_width(dtypes)
        if budget_bytes < cheapest * width:
            raise Unprocessable(
                f"budget_bytes {budget_bytes} is smaller than one rank-1 module of adapter {adapter.id} "
                f"({cheapest * width} bytes: {cheapest} parameters of {width} bytes)",
                code="budget_too_small",
            )


def output_width(dtypes: set[str]) -> int:
    """Bytes per parameter of a rank-reduced adapter: the input's float type, float32 when it mixes types."""
    return DTYPE_BYTES[dtypes.pop()] if len(dtypes) == 1 else 4


def safetensors_header(records: Records, key: str, settings: Settings) -> dict[str, Any]:
    """A stored safetensors file's header (tensor name -> {dtype, shape, data_offsets}), from ranged reads."""
    (length,) = struct.unpack("<Q", records.storage.get_range(key, 0, 8))
    if length > settings.max_safetensors_header_bytes:
        raise Unprocessable(f"stored file {key.rsplit('/', 1)[-1]} has an oversized header", code="invalid_input")
    header = json.loads(records.storage.get_range(key, 8, length))
    header.pop("__metadata__", None)
    return dict(header)


def adapter_costs(header: dict[str, Any]) -> tuple[dict[str, int], set[str]]:
    """Per module, the parameters one rank step costs (m + n), and the factors' dtypes."""
    shapes: dict[str, dict[str, list[int]]] = {}
    dtypes = set()
    for name, entry in header.items():
        match = _LORA_KEY.match(name)
        if match:
            shapes.setdefault(match["module"], {})[match["side"]] = entry["shape"]
            dtypes.add(entry["dtype"])
    costs = {module: sides["B"][0] + sides["A"][1] for module, sides in shapes.items() if len(sides) == 2}
    return costs, dtypes


def _check_models(records: Records, settings: Settings, tenant: str, spec: CompressJobCreate) -> None:
    base = records.get_resource("models", tenant, str(spec.base_model))
    tuned = records.get_resource("models", tenant, str(spec.model))
    for field in ("architecture", "model_type"):
        if getattr(base, field) != getattr(tuned, field):
            raise Unprocessable(
                f"base model {base.id} is {field} {getattr(base, field)!r} but model {tuned.id} is "
                f"{getattr(tuned, field)!r}: a LoRA can only be extracted between models of one architecture",
                code="incompatible_models",
            )
    base_shapes, tuned_shapes = (_weight_shapes(records, settings, m) for m in (base, tuned))
    for name in sorted(set(base_shapes) | set(tuned_shapes)):
        if name not in base_shapes or name not in tuned_shapes:
            where = base.id if name not in base_shapes else tuned.id
            raise Unprocessable(f"weight {name!r} is missing from model {where}", code="incompatible_models")
        if base_shapes[name] != tuned_shapes[name]:
            raise Unprocessable(
                f"weight {name!r} is {base_shapes[name]} in base model {base.id} but {tuned_shapes[name]} in "
                f"model {tuned.id}: the models' shapes differ",
                code="incompatible_models",
            )


def _weight_shapes(records: Records, settings: Settings, model: ModelRecord) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for item in model.files:
        if item.name.endswith(".safetensors"):
            key = keys.model(model.tenant, model.id, f"files/{item.name}")
            header = safetensors_header(records, key, settings)
            shapes.update({name: list(entry["shape"]) for name, entry in header.items()})
    return shapes
