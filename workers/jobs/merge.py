"""The merge job: fetch the adapters (SHA-256-checked), optionally tune λ / density / β on validation data
(`merge_tune.py`) or load a calibrated method's model and rows (`merge_calibration.py`), merge them file to
file, publish the result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from app.schemas.jobs import JobResult, MergeJobCreate
from workers.jobs.context import JobContext
from workers.jobs.inputs import adapter_record, fetch_adapter
from workers.jobs.outputs import adapter_result, publish_adapter
from workers.upkeep.scratch import job_scratch

FETCH_THREADS = 4  # parallel adapter downloads (I/O-bound: they do not compete with the merge's threads)


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
    from workers.device import current
    from workers.formats.lora import merge_adapter_files  # torch loads only here

    job, records = context.job, context.records
    spec = MergeJobCreate.model_validate(job.spec)
    with job_scratch(job.id) as scratch:
        root = Path(scratch)
        # the adapters are fetched in parallel (each SHA-256-checked); the merge starts when all are local
        adapters = [adapter_record(records, job.tenant, item.id) for item in spec.adapters]
        with ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="amend-fetch") as pool:
            futures = [pool.submit(fetch_adapter, records, adapter, root / "inputs") for adapter in adapters]
            for done, _ in enumerate(as_completed(futures), start=1):
                context.progress(0.3 * done / len(futures), f"fetched {done} of {len(futures)} adapters")
        inputs = [(*future.result(), item.weight) for future, item in zip(futures, spec.adapters, strict=True)]
        out_dir = root / "output"
        out_dir.mkdir()
        params, tuned, start, calibration = spec.params, None, 0.3, None
        if spec.calibration is not None:  # a calibrated method (rain): the base model and its rows
            from workers.jobs.merge_calibration import load_calibration

            context.progress(0.3, "calibration: fetching the base model and the calibration rows")
            calibration = load_calibration(context, spec.calibration, root)
            start = 0.4
        if spec.tune is not None:  # grid search on the validation rows first (0.3 → 0.8)
            from workers.jobs.merge_tune import tune_params

            with torch_threads(context.settings.merge_threads):
                params, tuned = tune_params(context, spec, spec.tune, inputs, root)
            start = 0.8

        def engine_progress(fraction: float, stage: str) -> None:
            context.progress(start + (0.9 - start) * fraction, stage)

        with torch_threads(context.settings.merge_threads):
            report = merge_adapter_files(
                inputs, spec.method, params, spec.output.model_dump(), out_dir, progress=engine_progress,
                device=current().torch_device, calibration=calibration,
            )
        if tuned is not None:
            report["tune"] = tuned
            (out_dir / "merge_report.json").write_text(json.dumps(report))
        context.progress(0.92, "storing the merged adapter")
        return publish_adapter(context, out_dir, spec.output.name, report)


