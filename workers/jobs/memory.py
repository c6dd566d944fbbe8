"""A job's estimated device memory need, from its records and the safetensors headers of its inputs (read by
range request: a few KiB, no tensor), before anything is loaded.

Every figure is float32 (4 bytes an element: the engines upcast), plus `OVERHEAD` for the allocator and
small intermediates:

- merge: every adapter's factors (the streaming reader holds a batch at a time, so this is an upper bound)
  plus the merged factors; the `full` space adds T dense m×n updates of the largest module, three times
  (the updates, the mask, the sum). A calibrated merge (rain) adds its model's weights twice (the weights, and
  one forward pass's activations and attention probabilities, counted as one more weights' worth).
- compress: the adapter's factors three times (input, QR factors, output); `extract` four copies of the
  largest tensor of the two models (it streams one module at a time) plus the extracted factors' bound.
- unlearn: the model's P parameters — weights 4P; a method that keeps a frozen reference copy
  (`reference_model` in its requirements) 4P more; training the whole model (`output: weights`) adds
  gradients and Adam's two moments, 12P (SGD with momentum: 8P); training a LoRA adds 12 bytes per LoRA
  parameter, counted as 2% of P; activations as one weights' worth per 32 rows of batch.

These are planning figures, not measurements of every model: docs/deploy.md lists measured peaks beside them.
"""

from __future__ import annotations

import math
from typing import Any

from app.jobs.compress import safetensors_header
from app.records import Records
from app.schemas.unlearn import UNLEARN_PARAMS, required_inputs
from app.settings import Settings
from app.storage import keys
from workers.jobs.context import JobContext
from workers.jobs.inputs import adapter_record, model_record

FP32 = 4
OVERHEAD = 128 * 2**20
LORA_FRACTION = 0.02
ROWS_PER_WEIGHTS_COPY = 32


def safetensors_shapes(records: Records, key: str, settings: Settings) -> dict[str, list[int]]:
    """Tensor name -> shape, from a stored safetensors file's header only (ranged reads)."""
    return {name: list(entry["shape"]) for name, entry in safetensors_header(records, key, settings).items()}


def _elements(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def _adapter_modules(records: Records, tenant: str, adapter_id: str, settings: Settings) -> dict[str, list[list[int]]]:
    shapes = safetensors_shapes(records, keys.adapter(tenant, adapter_id, "adapter_model.safetensors"), settings)
    modules: dict[str, list[list[int]]] = {}
    for name, shape in shapes.items():
        modules.setdefault(name.replace("lora_A", "lora_X").replace("lora_B", "lora_X"), []).append(shape)
    return modules


def merge_need(context: JobContext) -> tuple[int, str]:
    job, records, settings = context.job, context.records, context.settings
    spec = job.spec
    inputs, largest_dense = 0, 0
    for item in spec["adapters"]:
        adapter = adapter_record(records, job.tenant, item["id"])
        modules = _adapter_modules(records, job.tenant, adapter.id, settings)
        inputs += sum(math.prod(shape) for pair in modules.values() for shape in pair)
        for pair in modules.values():
            rows = max(shape[0] for shape in pair)  # lora_B: m×r
            cols = max(shape[1] for shape in pair)  # lora_A: r×n
            largest_dense = max(largest_dense, rows * cols)
    need = 2 * inputs * FP32
    detail = f"{len(spec['adapters'])} adapters, {inputs} factor elements"
    if (spec.get("params") or {}).get("space") == "full":
        need += 3 * len(spec["adapters"]) * largest_dense * FP32
        detail += f", full space over a {largest_dense}-element module"
    if spec.get("calibration"):  # rain: the base model in float32 and one forward pass's activations
        count = sum(_elements(shapes) for shapes in _model_shapes(records, job.tenant, spec["calibration"]["model"],
                                                                   settings))
        need += 2 * count * FP32
        detail += f", a calibration model of {count} parameters (weights and one pass's activations)"
    return need + OVERHEAD, detail


def compress_need(context: JobContext) -> tuple[int, str]:
    job, records, settings = context.job, context.records, context.settings
    spec = job.spec
    if spec.get("adapter"):
        adapter = adapter_record(records, job.tenant, spec["adapter"])
        elements = _elements(safetensors_shapes(records, keys.adapter(job.tenant, adapter.id,
                                                                      "adapter_model.safetensors"), settings))
        return 3 * elements * FP32 + OVERHEAD, f"an adapter of {elements} elements"
    largest = 0
    for role in ("base_model", "model"):
        if spec.get(role):
            for shapes in _model_shapes(records, job.tenant, spec[role], settings):
                largest = max([largest, *(math.prod(shape) for shape in shapes.values())])
    return 4 * largest * FP32 + OVERHEAD, f"extract, streamed by module (largest {largest} elements)"


def _model_shapes(records: Records, tenant: str, model_id: str, settings: Settings) -> list[dict[str, list[int]]]:
    model = model_record(records, tenant, model_id)
    return [safetensors_shapes(records, keys.model(tenant, model.id, f"files/{f.name}"), settings)
            for f in model.files if f.name.endswith(".safetensors")]


def unlearn_need(context: JobContext) -> tuple[int, str]:
    job, records, settings = context.job, context.records, context.settings
    spec = job.spec
    params_model = UNLEARN_PARAMS[spec["method"]]
    params: Any = params_model.model_validate(spec.get("params") or {})
    count = sum(_elements(shapes) for shapes in _model_shapes(records, job.tenant, spec["model"], settings))
    weights = count * FP32
    need, parts = weights, [f"{count} parameters: weights {weights}"]
    if "reference_model" in required_inputs(spec["method"], params):
        need += weights
        parts.append(f"frozen reference {weights}")
    per_trained = 8 if getattr(params, "optimizer", "adam") == "sgd" else 12
    trained = count if spec.get("output") == "weights" else int(count * LORA_FRACTION)
    need += trained * per_trained
    parts.append(f"gradients and optimiser state {trained * per_trained}")
    batch = int(getattr(params, "batch_size", ROWS_PER_WEIGHTS_COPY))
    activations = weights * batch // ROWS_PER_WEIGHTS_COPY
    need += activations
    parts.append(f"activations for batch {batch} {activations}")
    return need + OVERHEAD, ", ".join(parts)


NEEDS = {"merge": merge_need, "compress": compress_need, "unlearn": unlearn_need}


def estimate(context: JobContext) -> tuple[int, str]:
    """(bytes, how they were counted) for the context's job."""
    return NEEDS[context.job.type](context)
