"""The merge job: stream the adapters in (SHA-256-checked, `streamed_inputs.py`), optionally tune λ / density
/ β on validation data (`merge_tune.py`) or load a calibrated method's model and rows
(`merge_calibration.py`), merge them file to file as they arrive, publish the result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from app.schemas.jobs import JobResult, MergeJobCreate
from workers.jobs.context import JobCancelled, JobContext, LeaseLost
from workers.jobs.inputs import adapter_record
from workers.jobs.outputs import adapter_result, publish_adapter
from workers.jobs.streamed_inputs import StreamedAdapters
from workers.upkeep.scratch import job_scratch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def existing_result(context: JobContext) -> JobResult | None:
    return adapter_result(context.records, context.job)


def run(context: JobContext) -> JobResult:
    from workers.formats.lora import read_spans  # torch loads only here

    job, records = context.job, context.records
    spec = MergeJobCreate.model_validate(job.spec)
    with job_scratch(job.id) as scratch:
        root = Path(scratch)
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="amend-records") as pool:  # S3 round trips
            adapters = list(pool.map(lambda item: adapter_record(records, job.tenant, item.id), spec.adapters))
        context.progress(0.0, f"fetching {len(adapters)} adapters ({sum(a.size_bytes for a in adapters) >> 20} MiB)",
                         force=True)
        # the weights stream in (ranged GETs in the merge's read order, SHA-256 computed as they arrive) while
        # the merge reads each tensor as soon as its bytes are there; `verify` before anything is published
        with StreamedAdapters(records, adapters, root / "inputs", read_spans) as streamed:
            inputs = streamed.inputs([item.weight for item in spec.adapters])
            report = _merge(context, spec, streamed, inputs, root)
            streamed.verify()
        context.progress(0.92, "storing the merged adapter", force=True)
        return publish_adapter(context, root / "output", spec.output.name, report)


def _merge(context: JobContext, spec: MergeJobCreate, streamed: StreamedAdapters,
           inputs: list[tuple[dict, Path, float]], root: Path) -> dict:
    from workers.device import current
    from workers.formats.lora import merge_adapter_files

    out_dir = root / "output"
    out_dir.mkdir()
    params, tuned, start, calibration = spec.params, None, 0.05, None
    if spec.calibration is not None:  # a calibrated method (rain): the base model and its rows
        from workers.jobs.merge_calibration import load_calibration

        context.progress(0.05, "calibration: fetching the base model and the calibration rows")
        calibration = load_calibration(context, spec.calibration, root)
        start = 0.4
    if spec.tune is not None:  # grid search on the validation rows first (0.3 → 0.8), on complete inputs
        from workers.jobs.merge_tune import tune_params

        streamed.verify()
        with torch_threads(context.settings.merge_threads):
            params, tuned = tune_params(context, spec, spec.tune, inputs, root)
        start = 0.8

    def engine_progress(fraction: float, stage: str) -> None:
        context.progress(start + (0.9 - start) * fraction, stage, force=fraction in (0.0, 1.0))

    try:
        with torch_threads(context.settings.merge_threads):
            report = merge_adapter_files(
                inputs, spec.method, params, spec.output.model_dump(), out_dir, progress=engine_progress,
                device=current().torch_device, calibration=calibration, arrivals=streamed.arrivals,
            )
    except (JobCancelled, LeaseLost):
        raise
    except Exception:
        streamed.verify()  # a changed input is the cause, whatever the merge made of its bytes
        raise
    if tuned is not None:
        report["tune"] = tuned
        (out_dir / "merge_report.json").write_text(json.dumps(report))
    return report
