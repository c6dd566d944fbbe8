"""Does a compressed adapter still forget? Re-measure an unlearning job's forget and retain metrics on it.

Quantizing or truncating an unlearned adapter can undo the unlearning. When a compression job's input
adapter was made by an unlearning job (its record's `source_job_id`), the compression job loads that job's
model with the compressed adapter, measures the same splits (the same forget rows, retain and eval
datasets, the same seed) with the same `evaluate`, and compares with that job's own before/after numbers.

The verdict (`verdict`) uses the family's primary forget metric — a causal LM's forget-answer NLL (higher
is more forgotten), a classifier's forget accuracy (lower is) — and asks how much of the unlearning's change
survives: kept = (compressed − before) / (after − before); `forgetting_preserved` is kept ≥ 1 − tolerance.
An unlearning job that changed the metric by nothing measurable has nothing to lose (preserved).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.errors import NotFound
from app.schemas.adapters import AdapterRecord
from app.schemas.jobs import JobRecord, UnlearnJobCreate
from app.schemas.unlearn import UNLEARN_PARAMS
from workers.jobs.context import JobContext
from workers.jobs.inputs import dataset_record, fetch_dataset, fetch_model, model_record
from workers.jobs.outputs import report_key

log = logging.getLogger(__name__)

# family -> (primary forget metric, +1 when unlearning raises it / −1 when it lowers it)
PRIMARY: dict[str, tuple[str, int]] = {"causal_lm": ("forget_nll", 1), "classifier": ("forget_accuracy", -1)}
NEGLIGIBLE = 1e-6


def unlearning_source(context: JobContext, adapter: AdapterRecord) -> JobRecord | None:
    """The succeeded unlearning job that made `adapter` (as an adapter), if it did."""
    if not adapter.source_job_id:
        return None
    try:
        source = context.records.get_job(adapter.source_job_id, context.job.tenant)
    except NotFound:
        return None
    if source.type != "unlearn" or source.state != "succeeded" or source.spec.get("output", "adapter") != "adapter":
        return None
    return source


def verdict(family: str, before: dict[str, Any], after: dict[str, Any], compressed: dict[str, Any],
            tolerance: float) -> dict[str, Any]:
    """`forgetting_preserved` and how much of the unlearning's change of the primary metric survives."""
    metric, direction = PRIMARY[family]
    if metric not in before or metric not in after or metric not in compressed:
        return {"forgetting_preserved": None, "metric": metric, "reason": f"{metric} was not measured"}
    change = direction * (float(after[metric]) - float(before[metric]))
    kept_change = direction * (float(compressed[metric]) - float(before[metric]))
    if change <= NEGLIGIBLE * max(1.0, abs(float(before[metric]))):
        return {"forgetting_preserved": True, "metric": metric, "kept_fraction": None,
                "reason": "the unlearning job changed the forget metric by nothing measurable"}
    kept = kept_change / change
    return {"forgetting_preserved": kept >= 1.0 - tolerance, "metric": metric, "kept_fraction": kept,
            "tolerance": tolerance}


def recheck(
    context: JobContext, source: JobRecord, adapter_dir: Path, scratch: Path, tolerance: float
) -> dict[str, Any]:
    """Re-measure `source`'s splits on the adapter in `adapter_dir`; the verdict and the three measurements."""
    from peft import PeftModel

    from workers.device import current
    from workers.engines.unlearn.metrics import evaluate
    from workers.formats.hf_models import load_data, load_model, max_tokens

    records, tenant = context.records, context.job.tenant
    spec = UnlearnJobCreate.model_validate(source.spec)
    seed = int(UNLEARN_PARAMS[spec.method].model_validate(spec.params).seed)
    try:
        stored = records.storage.get_json(report_key(source))
    except NotFound:
        stored = (source.result.report if source.result else None) or {}
    before, after = stored.get("before") or {}, stored.get("after") or {}
    model_in = model_record(records, tenant, spec.model)
    context.progress(0.8, "re-measuring the unlearning job's metrics")
    model, tokenizer = load_model(fetch_model(records, model_in, scratch / "recheck-model"), model_in)
    device = current().torch_device  # the worker's, as the unlearning job's own measurements ran on its worker's
    model = PeftModel.from_pretrained(model, adapter_dir).to(device)
    length = max_tokens(model)
    forget_record = dataset_record(records, tenant, spec.forget.dataset)
    rows = spec.forget.rows if spec.forget.rows is not None else list(range(forget_record.rows))
    splits: dict[str, Any] = {"forget": load_data(fetch_dataset(records, forget_record, scratch), forget_record, rows,
                                                  model_in.family, tokenizer, length)}
    for role, dataset_id in (("retain", spec.retain), ("eval", spec.eval_)):
        if dataset_id is None:
            splits[role] = None
            continue
        record = dataset_record(records, tenant, dataset_id)
        splits[role] = load_data(fetch_dataset(records, record, scratch), record, None, model_in.family, tokenizer,
                                 length)
    compressed = evaluate(model, model_in.family, splits["forget"], splits["retain"], splits["eval"],
                          device, seed)
    result = verdict(model_in.family, before, after, compressed, tolerance)
    log.info("re-measured forgetting", extra={"job_id": context.job.id, "source_job_id": source.id,
                                              "preserved": result["forgetting_preserved"]})
    return {**result, "source_job_id": source.id, "before": before, "after": after, "compressed": compressed}
