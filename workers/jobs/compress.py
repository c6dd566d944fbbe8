"""The compression job: fetch the adapter (or the two models), compress file to file, re-check forgetting when
the adapter came from an unlearning job, publish the output adapter and its report.

The output adapter id derives from the job id, so a redelivered job whose adapter and report exist finishes
without recomputing (`existing_result`). Storage order: the compact file (sparsify_quantize), the report,
then the adapter's files and its record last (`workers/jobs/outputs.publish_adapter`); a failed publish
removes the adapter's prefix, compact file included.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.schemas.compress import ADAPTER_METHODS
from app.schemas.jobs import CompressJobCreate, JobResult
from app.storage import keys
from workers.jobs.context import InputCorrupted, InputRejected, JobContext
from workers.jobs.inputs import adapter_record, fetch_adapter, fetch_model, model_record
from workers.jobs.merge import torch_threads
from workers.jobs.outputs import adapter_result, output_adapter_id, publish_adapter
from workers.upkeep.scratch import job_scratch

log = logging.getLogger(__name__)
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classifier": "SEQ_CLS"}


def existing_result(context: JobContext) -> JobResult | None:
    return adapter_result(context.records, context.job)


def run(context: JobContext) -> JobResult:
    from workers.device import current
    from workers.formats.compact import COMPACT_FILE
    from workers.jobs.compress_files import compress_adapter_files, extract_model_files  # torch loads only here

    job, records = context.job, context.records
    spec = CompressJobCreate.model_validate(job.spec)

    def engine_progress(fraction: float, stage: str) -> None:
        context.progress(0.1 + 0.6 * fraction, stage)

    with job_scratch(job.id) as scratch:
        root = Path(scratch)
        out_dir = root / "output"
        source = None
        with torch_threads(context.settings.merge_threads):
            if spec.method in ADAPTER_METHODS:
                adapter = adapter_record(records, job.tenant, str(spec.adapter))
                config, weights = fetch_adapter(records, adapter, root / "inputs")
                context.progress(0.1, "fetched the adapter")
                report = compress_adapter_files(
                    config, weights, spec.method, spec.params, spec.output, out_dir, progress=engine_progress,
                    device=current().torch_device,
                )
                from workers.jobs.forgetting import unlearning_source

                source = unlearning_source(context, adapter)
                inputs: dict[str, Any] = {"adapter": {"id": adapter.id, "sha256": adapter.sha256}}
            else:
                base = model_record(records, job.tenant, str(spec.base_model))
                tuned = model_record(records, job.tenant, str(spec.model))
                base_dir = fetch_model(records, base, root / "base")
                tuned_dir = fetch_model(records, tuned, root / "tuned")
                context.progress(0.1, "fetched the models")
                report = extract_model_files(
                    base_dir, tuned_dir, base.id, TASK_TYPES.get(tuned.family), spec.params, spec.output, out_dir,
                    progress=engine_progress, device=current().torch_device,
                )
                inputs = {"base_model": {"id": base.id, "sha256": base.sha256},
                          "model": {"id": tuned.id, "sha256": tuned.sha256}}
        if source is not None:
            report["forgetting"] = _recheck(context, source, out_dir, root, float(spec.params["forgetting_tolerance"]))
            report["summary"]["forgetting_preserved"] = report["forgetting"]["forgetting_preserved"]
        report = {**report, "job_id": job.id, "inputs": inputs}
        log.info("compressed; storing the output", extra={
            "job_id": job.id, "method": spec.method, "rel_error": report["summary"]["rel_error"],
            "ratio": report["summary"]["ratio"]})
        context.progress(0.92, "storing the compressed adapter")
        if (out_dir / COMPACT_FILE).exists():
            key = keys.adapter(job.tenant, output_adapter_id(job.id), COMPACT_FILE)
            records.storage.upload_path(key, out_dir / COMPACT_FILE)
        return publish_adapter(context, out_dir, spec.output.name, report)


def _recheck(context: JobContext, source: Any, out_dir: Path, root: Path, tolerance: float) -> dict[str, Any]:
    from workers.jobs.forgetting import recheck

    try:
        return recheck(context, source, out_dir, root, tolerance)
    except InputCorrupted:
        raise
    except InputRejected as error:  # the unlearning job's model or datasets were deleted since
        return {"forgetting_preserved": None, "source_job_id": source.id,
                "reason": f"cannot re-measure: {error}"}
