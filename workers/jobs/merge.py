"""The merge job: fetch the adapters (SHA-256-checked), merge them file to file, publish the result."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.schemas.jobs import JobResult, MergeJobCreate
from workers.jobs.context import JobContext
from workers.jobs.inputs import adapter_record, fetch_adapter
from workers.jobs.outputs import adapter_result, publish_adapter
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
    from workers.device import current
    from workers.formats.lora import merge_adapter_files  # torch loads only here

    job, records = context.job, context.records
    spec = MergeJobCreate.model_validate(job.spec)
    with job_scratch(job.id) as scratch:
        root = Path(scratch)
        inputs = []
        for position, item in enumerate(spec.adapters):
            adapter = adapter_record(records, job.tenant, item.id)
            config, weights = fetch_adapter(records, adapter, root / "inputs")
            inputs.append((config, weights, item.weight))
            context.progress(0.3 * (position + 1) / len(spec.adapters), f"fetched adapter {position + 1}")
        out_dir = root / "output"
        out_dir.mkdir()

        def engine_progress(fraction: float, stage: str) -> None:
            context.progress(0.3 + 0.6 * fraction, stage)

        with torch_threads(context.settings.merge_threads):
            report = merge_adapter_files(
                inputs, spec.method, spec.params, spec.output.model_dump(), out_dir, progress=engine_progress,
                device=current().torch_device,
            )
        context.progress(0.92, "storing the merged adapter")
        return publish_adapter(context, out_dir, spec.output.name, report)


