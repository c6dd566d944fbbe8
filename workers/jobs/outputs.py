"""Where a job's outputs go: ids and keys derived from the job id (so a redelivered job finds what it already
stored), and publishing an output adapter (files first, the record last)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.adapter_store import store_adapter
from app.deletion.lineage import parents_of
from app.errors import NotFound
from app.records import Records
from app.schemas.jobs import JobRecord, JobResult
from app.storage import keys
from workers.jobs.context import JobContext


def _suffix(job_id: str) -> str:
    return job_id.split("_", 1)[1]


def output_adapter_id(job_id: str) -> str:
    """The job's output adapter id: deterministic, and time-ordered like the job id it comes from."""
    return "ad_" + _suffix(job_id)


def output_model_id(job_id: str) -> str:
    """The model a job with output `weights` registers: deterministic from the job id."""
    return "md_" + _suffix(job_id)


def report_key(job: JobRecord) -> str:
    return keys.job(job.tenant, job.id, "results/report.json")


def audit_key(job: JobRecord) -> str:
    return keys.job(job.tenant, job.id, "results/audit.json")


def adapter_result(records: Records, job: JobRecord) -> JobResult | None:
    """The result of a job whose output adapter and report are both already stored, else None."""
    try:
        adapter = records.get_adapter(job.tenant, output_adapter_id(job.id))
        report = records.storage.get_json(report_key(job))
    except NotFound:
        return None
    return JobResult(
        adapter_id=adapter.id, adapter_ids=[adapter.id], report=report.get("summary"), report_key=report_key(job)
    )


def publish_adapter(context: JobContext, directory: Path, name: str, report: dict[str, Any]) -> JobResult:
    """Store an output adapter and its report under keys derived from the job id; the record goes last and names
    its parents (lineage)."""
    job, records, settings = context.job, context.records, context.settings
    adapter_id = output_adapter_id(job.id)
    records.storage.put_json(report_key(job), report)
    store_adapter(
        records,
        settings,
        tenant=job.tenant,
        adapter_id=adapter_id,
        name=name,
        config=json.loads((directory / "adapter_config.json").read_text()),
        weights=directory / "adapter_model.safetensors",
        source_job_id=job.id,
        parents=parents_of(records, job),  # lineage: what the job's spec made it from
    )
    return JobResult(
        adapter_id=adapter_id,
        adapter_ids=[adapter_id],
        report=report.get("summary"),
        report_key=report_key(job),
        warnings=output_warnings(report.get("summary") or {}),
    )


# a merge whose output keeps less than this fraction of the plain sum's norm is all but the base model
VANISHED_UPDATE = 0.05


# a compressed adapter whose update is this far from its input's (relative Frobenius error) keeps little of it
FAR_FROM_INPUT = 0.5


def output_warnings(summary: dict[str, Any]) -> list[str]:
    """The warnings a succeeded merge or compression carries when its output is all but useless: a merged
    update that all but vanished (`VANISHED_UPDATE`), a compressed one far from its input (`FAR_FROM_INPUT`)."""
    warnings = []
    kept = summary.get("output_norm_fraction_total")
    if kept is not None and kept < VANISHED_UPDATE:
        warnings.append(
            f"the merged update keeps {100 * kept:.1f}% of the size of the inputs' plain sum (λ·Σ w_t·ΔW_t): the "
            "result is all but the base model (rain: the projection or the coefficients removed the update; see "
            "the report)"
        )
    error = summary.get("rel_error")
    if error is not None and error > FAR_FROM_INPUT:
        warnings.append(
            f"the compressed update is far from the input's (rel_error {error:.2f} > {FAR_FROM_INPUT}): it keeps "
            "little of what the adapter did; see the report's per-module errors (sparsify_quantize: a higher density)"
        )
    return warnings
